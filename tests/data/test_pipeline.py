"""The input pipeline: deterministic, resumable, host-count invariant, exact eval."""
import itertools

import jax
import numpy as np
import pytest

from conftest import tiny_config
from segjax.data import pipeline
from segjax.errors import DataError
from segjax.train import loop


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def test_train_batches_are_deterministic_and_resumable(shapes_dir):
  config = tiny_config(shapes_dir)
  # 48 training examples, 8 a step: step 6 starts the second epoch.
  full = _take(pipeline.train_batches(config, process_index=0, process_count=1), 9)
  again = _take(pipeline.train_batches(config, process_index=0, process_count=1), 9)
  resumed = _take(pipeline.train_batches(config, start_step=5, process_index=0,
                                         process_count=1), 4)
  for a, b in zip(full, again):
    np.testing.assert_array_equal(a["image"], b["image"])
  for a, b in zip(full[5:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  first = full[0]
  assert first["image"].shape == (8, 32, 32, 3) and first["image"].dtype == np.float32
  assert first["label"].shape == (8, 32, 32) and first["label"].dtype == np.int32
  # Epochs are reshuffled and augmented afresh.
  assert not np.array_equal(full[0]["image"], full[6]["image"])
  values = np.unique(np.concatenate([b["label"].ravel() for b in full]))
  assert set(values) <= {0, 1, 2, 3, 255} and {0, 1, 2, 3} <= set(values)


def test_train_batches_do_not_depend_on_process_count(shapes_dir):
  config = tiny_config(shapes_dir, "data.num_shards=2")
  single = _take(pipeline.train_batches(config, process_index=0, process_count=1), 3)
  hosts = [_take(pipeline.train_batches(config, process_index=i, process_count=2), 3)
           for i in range(2)]
  for step, whole in enumerate(single):
    joined = np.concatenate([hosts[0][step]["image"], hosts[1][step]["image"]])
    np.testing.assert_array_equal(joined, whole["image"])


@pytest.mark.parametrize("process_count,local_devices", [(1, 1), (1, 3), (2, 3), (3, 1)])
def test_eval_batches_cover_each_example_once(shapes_dir, process_count, local_devices):
  config = tiny_config(shapes_dir, "eval.batch_size=4")
  seen, batch_counts = [], []
  for index in range(process_count):
    batches = list(pipeline.eval_batches(config, process_index=index,
                                         process_count=process_count,
                                         local_devices=local_devices))
    batch_counts.append(len(batches))
    for batch in batches:
      assert batch["image"].shape[0] % local_devices == 0
      real = batch["mask"] == 1
      seen.extend(batch["image"][real].reshape(int(real.sum()), -1).sum(1).round(3))
      assert (batch["label"][~real] == 255).all()
  assert len(set(batch_counts)) == 1  # Every host runs the same number of steps.
  reference = [b["image"].reshape(b["image"].shape[0], -1).sum(1).round(3)
               for b in pipeline.eval_batches(config, process_index=0, process_count=1)]
  assert len(seen) == 16
  assert sorted(seen) == sorted(np.concatenate(reference))


@pytest.mark.parametrize("num_devices", [1, 3, 8])
def test_evaluation_counts_each_pixel_once(shapes_dir, tmp_path, num_devices):
  config = tiny_config(shapes_dir, "eval.batch_size=5")
  with loop.Trainer(config, str(tmp_path), devices=jax.devices()[:num_devices]) as trainer:
    state, _ = trainer.initial_state()
    result = trainer.evaluate(state)
  assert result["num_pixels"] == 16 * 64 * 64
  assert 0.0 <= result["miou"] <= 1.0


def test_labels_out_of_range_are_refused(shapes_dir):
  config = tiny_config(shapes_dir, "num_classes=2")
  with pytest.raises(DataError, match=r"label values \[2, 3\] outside \[0, 2\)"):
    next(pipeline.train_batches(config, process_index=0, process_count=1))


def test_empty_split_is_refused(shapes_dir):
  config = tiny_config(shapes_dir, "eval.split=validation[:0]")
  with pytest.raises(DataError, match="is empty"):
    next(pipeline.eval_batches(config, process_index=0, process_count=1))


def test_unet_weighted_loss_gets_border_weights(shapes_dir):
  config = tiny_config(shapes_dir, "loss.name=unet_weighted")
  batch = next(pipeline.train_batches(config, process_index=0, process_count=1))
  weight, label = batch["weight"], batch["label"]
  assert weight.shape == label.shape and weight.dtype == np.float32
  assert (weight[label == 255] == 0).all()
  # Background between objects carries the border term on top of w_c.
  background = weight[label == 0]
  assert background.max() > 2 * np.median(background)
