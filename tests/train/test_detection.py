"""Training and evaluating a detector through segjax's loop and CLI:
frozen params stay put, one compiled step serves every instance count,
detections map back to the stored image, and train / eval / predict run on
configs/mask_rcnn_shapes.py:tiny."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from PIL import Image

from conftest import REPO, SMALL_DATASET
from segjax import cli
from segjax.models.detection.mask_rcnn import TINY, build_mask_rcnn, trainable_mask
from segjax.models.detection.postprocess import paste_masks
from segjax.train import detection, optim, steps
from segjax.train.state import init_state

H, W, G = 64, 64, 4


def _batch(counts, seed):
  """Box-shaped instances: counts[i] of them in image i, the rest padding."""
  rng = np.random.RandomState(seed)
  n = len(counts)
  boxes = np.zeros((n, G, 4), np.float32)
  classes = np.zeros((n, G), np.int32)
  masks = np.zeros((n, G, H, W), np.uint8)
  for i, k in enumerate(counts):
    for j in range(k):
      x1, y1 = rng.randint(0, 40, size=2)
      x2, y2 = x1 + rng.randint(10, 24), y1 + rng.randint(10, 24)
      boxes[i, j], classes[i, j] = (x1, y1, x2, y2), rng.randint(1, 4)
      masks[i, j, y1:y2, x1:x2] = 1
  return {"image": rng.randn(n, H, W, 3).astype(np.float32),
          "image_size": np.full((n, 2), (H, W), np.int32), "boxes": boxes,
          "classes": classes, "masks": masks, "valid": classes > 0}


def test_step_freezes_params_and_compiles_once():
  model = build_mask_rcnn("mask_rcnn_r50_fpn", 4, **TINY)  # 3 trainable layers
  # Weight decay would move frozen params if they went through the optimizer.
  tx = optim.freeze(optax.adamw(1e-2, weight_decay=0.5),
                    functools.partial(trainable_mask, model))
  state = jax.jit(init_state, static_argnums=(0, 1, 3))(
      model, tx, jax.random.PRNGKey(0), (H, W, 3))
  step = jax.jit(lambda s, b, r: steps.instance_train_step(
      s, b, r, model=model, tx=tx, schedule=lambda _: 1e-2))
  new = state
  for i, counts in enumerate([(2, 1), (0, 4), (0, 0)]):
    new, metrics = step(new, _batch(counts, i), jax.random.PRNGKey(i))
    assert np.isfinite(metrics["loss"]) and metrics["finite"] == 1.0
  assert step._cache_size() == 1
  assert {"loss_objectness", "loss_mask", "grad_norm"} <= set(metrics)
  assert int(new.step) == 3
  trains = traverse_util.flatten_dict(trainable_mask(model, state.params))
  before = traverse_util.flatten_dict(state.params)
  after = traverse_util.flatten_dict(new.params)
  frozen = [k for k, t in trains.items() if not t]
  assert ("backbone", "body", "layer1_0", "conv1", "kernel") in frozen
  for k in frozen:
    np.testing.assert_array_equal(after[k], before[k], err_msg=str(k))
  moved = [k for k, t in trains.items() if t and not np.array_equal(after[k], before[k])]
  assert len(moved) == sum(trains.values())


def test_to_original_scales_boxes_and_pastes_at_the_stored_size():
  rng = np.random.RandomState(0)
  d, m = 5, 28
  dets = {"boxes": np.array([[4, 6, 30, 40], [0, 0, 75, 50], [10, 10, 20, 20],
                             [60, 30, 75, 50], [1, 1, 2, 2]], np.float32),
          "scores": np.linspace(0.9, 0.1, d).astype(np.float32),
          "classes": np.array([1, 2, 3, 1, 2], np.int32),
          "valid": np.array([True, True, True, True, False]),
          "mask_probs": rng.rand(d, m, m).astype(np.float32)}
  # Resized to 50 x 75 on the canvas; stored at 100 x 150 (scale 2).
  out = detection.to_original(dets, (50, 75), (100, 150))
  np.testing.assert_allclose(out["boxes"], dets["boxes"][:4] * 2)
  np.testing.assert_array_equal(out["classes"], dets["classes"][:4])
  want = np.asarray(paste_masks(jnp.asarray(dets["mask_probs"][:4]), out["boxes"], (100, 150)))
  assert out["masks"].shape == (4, 100, 150) and out["masks"].dtype == bool
  np.testing.assert_array_equal(out["masks"], want)
  assert out["masks"].sum() > 0


@pytest.fixture(scope="module")
def trained(shapes_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("mask_rcnn")
  argv = ["train", "--config", os.path.join(REPO, "configs", "mask_rcnn_shapes.py:tiny"),
          "--workdir", str(workdir), f"--config.dataset={SMALL_DATASET}",
          f"--config.data_dir={shapes_dir}"]
  assert cli.main(argv) == 0
  return workdir


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_train_logs_losses_and_coco_ap(trained, capsys):
  rows = _rows(trained)
  train = [r for r in rows if r["split"] == "train"]
  assert train and {"loss", "loss_classifier", "loss_mask"} <= set(train[-1])
  evals = [r for r in rows if r["split"] == "validation"]
  assert [r["step"] for r in evals] == [4]
  for key in ("box_ap", "box_ap50", "mask_ap", "mask_ap50", "mask_ar100"):
    assert 0.0 <= evals[-1][key] <= 1.0, key
  assert len(evals[-1]["mask_per_class_ap"]) == 3
  assert evals[-1]["num_images"] == 16    # the small validation split


def test_eval_and_predict(trained, tmp_path, capsys):
  assert cli.main(["eval", "--workdir", str(trained), "--split", "test"]) == 0
  out = capsys.readouterr().out
  assert "mask AP" in out and "per-class mask AP: circle" in out
  assert [r for r in _rows(trained) if r["split"] == "test"][0]["num_images"] == 8
  image = (np.random.RandomState(0).rand(48, 80, 3) * 255).astype(np.uint8)
  Image.fromarray(image).save(tmp_path / "photo.png")
  out_dir = tmp_path / "out"
  assert cli.main(["predict", "--workdir", str(trained), "--output", str(out_dir),
                   str(tmp_path / "photo.png")]) == 0
  drawn = np.asarray(Image.open(out_dir / "photo_instances.png"))
  assert drawn.shape == (48, 80, 3)
  assert np.asarray(Image.open(out_dir / "photo_instance_ids.png")).shape == (48, 80)
  with open(out_dir / "photo_detections.json") as f:
    found = json.load(f)
  for det in found:
    assert det["name"] in ("circle", "rectangle", "triangle")
    x1, y1, x2, y2 = det["box"]
    assert 0 <= x1 <= x2 <= 80 and 0 <= y1 <= y2 <= 48


def test_too_few_classes_is_a_data_error(shapes_dir, tmp_path, capsys):
  argv = ["train", "--config", os.path.join(REPO, "configs", "mask_rcnn_shapes.py:tiny"),
          "--workdir", str(tmp_path), f"--config.dataset={SMALL_DATASET}",
          f"--config.data_dir={shapes_dir}", "--config.num_classes=3"]
  assert cli.main(argv) == 2
  assert "num_classes counts the background" in capsys.readouterr().err
