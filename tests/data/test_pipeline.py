"""The input pipeline: deterministic, resumable, host-count invariant, exact eval."""
import itertools

import jax
import numpy as np
import pytest

from conftest import tiny_config
from segjax import metrics
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


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_eval_examples_cover_each_example_once(shapes_dir, process_count):
  config = tiny_config(shapes_dir)
  seen = []
  for index in range(process_count):
    seen += [(name, image.sum().round(3)) for name, image, _ in pipeline.eval_examples(
        config, process_index=index, process_count=process_count)]
  reference = [(name, image.sum().round(3)) for name, image, _ in
               pipeline.eval_examples(config, process_index=0, process_count=1)]
  assert len(seen) == 16 and len(set(name for name, _ in seen)) == 16
  assert sorted(seen) == sorted(reference)


@pytest.fixture(scope="module")
def initial_state(shapes_dir, tmp_path_factory):
  """The tiny U-Net's initial state on the host (initialising it takes most
  of an evaluation's time, and it is the same for every device count)."""
  config = tiny_config(shapes_dir)
  with loop.Trainer(config, str(tmp_path_factory.mktemp("init")),
                    devices=jax.devices()[:1]) as trainer:
    state, _ = trainer.initial_state()
    return jax.device_get(trainer.par.host_state(state))


def _evaluate_on(data_dir, workdir, state, num_devices, mode, monkeypatch):
  """Trainer.evaluate's scores and the confusion matrix they came from."""
  seen = []
  scores = metrics.scores
  monkeypatch.setattr(metrics, "scores", lambda cm: seen.append(cm) or scores(cm))
  config = tiny_config(data_dir, "eval.batch_size=5", f"parallel.mode={mode}")
  with loop.Trainer(config, str(workdir), devices=jax.devices()[:num_devices]) as trainer:
    result = trainer.evaluate(trainer.par.put_state(state))
  (confusion,) = seen
  return result, np.asarray(confusion)


@pytest.fixture(scope="module")
def one_device_evaluation(shapes_dir, tmp_path_factory, initial_state):
  with pytest.MonkeyPatch.context() as monkeypatch:
    return _evaluate_on(shapes_dir, tmp_path_factory.mktemp("one_device"), initial_state,
                        1, "jit", monkeypatch)


def test_one_device_evaluation_counts_each_pixel_once(one_device_evaluation):
  result, confusion = one_device_evaluation
  assert result["num_pixels"] == confusion.sum() == 16 * 64 * 64
  # The initial model predicts several classes, so a device that scored
  # another example's pixels, or one example twice, would show.
  assert (confusion.sum(0) > 0).sum() >= 2


@pytest.mark.parametrize("num_devices,mode", [(3, "jit"), (8, "jit"), (3, "pmap")])
def test_evaluation_on_devices_equals_one_device(shapes_dir, tmp_path, monkeypatch,
                                                 initial_state, one_device_evaluation,
                                                 num_devices, mode):
  """16 examples, 5 per call (rounded up to 2 per device on 3 devices, 1 on
  8, blanks filling the last call): every pixel is scored once, by the same
  model, so the confusion matrix (and so every score) equals the
  single-device one."""
  want, want_confusion = one_device_evaluation
  result, confusion = _evaluate_on(shapes_dir, tmp_path, initial_state, num_devices,
                                   mode, monkeypatch)
  np.testing.assert_array_equal(confusion, want_confusion)
  np.testing.assert_equal(result, want)


def test_labels_out_of_range_are_refused(shapes_dir):
  config = tiny_config(shapes_dir, "num_classes=2")
  with pytest.raises(DataError, match=r"label values \[2, 3\] outside \[0, 2\)"):
    next(pipeline.train_batches(config, process_index=0, process_count=1))


def test_empty_split_is_refused(shapes_dir):
  config = tiny_config(shapes_dir, "eval.split=validation[:0]")
  with pytest.raises(DataError, match="is empty"):
    next(pipeline.eval_examples(config, process_index=0, process_count=1))


def test_unet_weighted_loss_gets_border_weights(shapes_dir):
  config = tiny_config(shapes_dir, "loss.name=unet_weighted")
  batch = next(pipeline.train_batches(config, process_index=0, process_count=1))
  weight, label = batch["weight"], batch["label"]
  assert weight.shape == label.shape and weight.dtype == np.float32
  assert (weight[label == 255] == 0).all()
  # Background between objects carries the border term on top of w_c.
  background = weight[label == 0]
  assert background.max() > 2 * np.median(background)
