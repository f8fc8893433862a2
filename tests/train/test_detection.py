"""Training and evaluating a detector through segjax's loop and CLI:
frozen params stay put, one compiled step serves every instance count,
detections map back to the stored image (perfect ones score AP 1.0 through
the loop's evaluation, boxes alone for Faster R-CNN), train / eval /
predict run on configs/mask_rcnn_shapes.py:tiny, and a detector without
masks predicts boxes."""
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
from pycocotools import mask as mask_utils

from conftest import REPO, SMALL_DATASET
from segjax import cli, coco_eval
from segjax import config as config_lib
from segjax.data import builders, instances
from segjax.data.builders import coco
from segjax.models.detection.mask_rcnn import TINY, build_detector, trainable_mask
from segjax.models.detection.postprocess import paste_boxes, paste_masks
from segjax import detections, predict
from segjax.tasks import instance
from segjax.train import loop, optim, steps
from segjax.train.state import init_state

# Mask R-CNN's train, evaluation and predict programs: a few minutes of
# compiling, so the file starts first.
pytestmark = pytest.mark.slow(seconds=180)

H, W, G = 64, 64, 4


def _batch(counts, seed):
  """Box-shaped instances: counts[i] of them in image i, the rest padding."""
  rng = np.random.RandomState(seed)
  n = len(counts)
  boxes = np.zeros((n, G, 4), np.float32)
  classes = np.zeros((n, G), np.int32)
  for i, k in enumerate(counts):
    for j in range(k):
      x1, y1 = rng.randint(0, 40, size=2)
      x2, y2 = x1 + rng.randint(10, 24), y1 + rng.randint(10, 24)
      boxes[i, j], classes[i, j] = (x1, y1, x2, y2), rng.randint(1, 4)
  # Box-shaped masks: their crops are all on (padding rows all off).
  crops = np.where(classes[..., None, None] > 0, 255, 0).astype(np.uint8)
  crops = np.tile(crops, (1, 1, 14, 14))
  return {"image": rng.randn(n, H, W, 3).astype(np.float32),
          "image_size": np.full((n, 2), (H, W), np.int32), "boxes": boxes,
          "classes": classes, "mask_crops": crops,
          "mask_boxes": boxes, "valid": classes > 0}


def test_step_freezes_params_and_compiles_once():
  model = build_detector("mask_rcnn_r50_fpn", 4, **TINY)  # 3 trainable layers
  # Weight decay would move frozen params if they went through the optimizer.
  tx = optim.freeze(optax.adamw(1e-2, weight_decay=0.5),
                    functools.partial(trainable_mask, model))
  state = jax.jit(init_state, static_argnums=(0, 1, 3))(
      model, tx, jax.random.PRNGKey(0), (H, W, 3))
  step = jax.jit(lambda s, b, r: steps.train_step(
      s, b, r, model=model, tx=tx, schedule=lambda _: 1e-2, objective=instance.objective))
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
  out = detections.to_original(dets, (50, 75), (100, 150))
  np.testing.assert_allclose(out["boxes"], dets["boxes"][:4] * 2)
  np.testing.assert_array_equal(out["classes"], dets["classes"][:4])
  want = np.asarray(paste_masks(jnp.asarray(dets["mask_probs"][:4]), out["boxes"], (100, 150)))
  assert out["masks"].shape == (4, 100, 150) and out["masks"].dtype == bool
  np.testing.assert_array_equal(out["masks"], want)
  assert out["masks"].sum() > 0
  # A detector without masks: the same boxes, scores and classes, no masks.
  boxes_only = detections.to_original({k: v for k, v in dets.items() if k != "mask_probs"},
                                      (50, 75), (100, 150))
  assert set(boxes_only) == {"boxes", "scores", "classes"}
  for k, v in boxes_only.items():
    np.testing.assert_array_equal(v, out[k])


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


_ADD_DETECTIONS = coco_eval.CocoEvaluator.add_detections


def _detections_on(workdir, num_devices, monkeypatch, tmp_path):
  """The test split's detections (as CocoEvaluator receives them) and scores
  of the run's last checkpoint, evaluated on the first `num_devices`."""
  seen = {}

  def record(self, image_id, boxes, scores, classes, masks):
    assert image_id not in seen, f"image {image_id} evaluated twice"
    seen[image_id] = (boxes, scores, classes, masks)
    _ADD_DETECTIONS(self, image_id, boxes, scores, classes, masks)
  monkeypatch.setattr(coco_eval.CocoEvaluator, "add_detections", record)
  config = config_lib.load_config(os.path.join(workdir, "config.json"),
                                  ["eval.batch_size=6"])
  with loop.Trainer(config, str(workdir), devices=jax.devices()[:num_devices]) as trainer:
    state, _ = trainer.initial_state()
    result = trainer.evaluate(state, "test")
  return seen, result


def test_sharded_evaluation_equals_one_device(trained, monkeypatch, tmp_path):
  """The trained detector on the test split (8 images, batches of 6: a
  padded last batch) over 4 devices and over 1: each image once, the same
  detections and the same AP."""
  one, one_result = _detections_on(trained, 1, monkeypatch, tmp_path)
  four, four_result = _detections_on(trained, 4, monkeypatch, tmp_path)
  assert sorted(four) == sorted(one) and len(one) == one_result["num_images"] == 8
  assert sum(len(d[1]) for d in one.values()) > 0
  for image_id, (boxes, scores, classes, masks) in one.items():
    other = four[image_id]
    # A device's batch is 1-2 images here and 6 there: XLA's convolutions
    # round differently (boxes were seen 1 ulp apart), so near-equality;
    # a pixel whose probability sits at 0.5 within that error may flip.
    np.testing.assert_allclose(other[0], boxes, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(other[1], scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(other[2], classes)
    assert np.mean(other[3] != masks) < 1e-3
  for key in ("box_ap", "box_ap50", "mask_ap", "mask_ap50", "num_detections"):
    assert four_result[key] == pytest.approx(one_result[key], abs=1e-6), key


def test_a_detector_without_masks_trains_and_scores_without_them():
  faster = build_detector("faster_rcnn_r50_fpn", 4, **TINY)
  assert instance.train_keys(faster) == tuple(k for k in instance.TRAIN_KEYS
                                              if k not in ("mask_crops", "mask_boxes"))
  assert instance.iou_types(faster) == ("bbox",)
  masked = build_detector("mask_rcnn_r50_fpn", 4, **TINY)
  assert instance.train_keys(masked) == instance.TRAIN_KEYS
  assert instance.iou_types(masked) == ("bbox", "segm")


class _BoxOnlyDetector:
  """A stand-in for a detector without masks (Faster R-CNN's outputs): one
  "rectangle" at canvas pixels (8, 4, 40, 24) and an empty slot, whatever
  the image."""
  masks = False

  def apply(self, variables, images, image_size, train=False, paste=True):
    del variables, image_size, train, paste
    n = images.shape[0]
    one = {"boxes": [[8.0, 4.0, 40.0, 24.0], [0.0] * 4], "scores": [0.9, 0.0],
           "classes": [2, 0], "valid": [True, False]}
    return {k: jnp.tile(jnp.asarray(v)[None], (n,) + (1,) * jnp.asarray(v).ndim)
            for k, v in one.items()}


def test_predict_without_masks_writes_boxes_and_no_id_map(shapes_dir, tmp_path):
  config = config_lib.load_config(
      os.path.join(REPO, "configs", "faster_rcnn_shapes.py:tiny"),
      [f"dataset={SMALL_DATASET}", f"data_dir={shapes_dir}"])
  image = np.full((48, 80, 3), 90, np.uint8)
  Image.fromarray(image).save(tmp_path / "photo.png")
  out_dir = tmp_path / "out"
  written = predict.instance_files(_BoxOnlyDetector(), {}, config,
                                   [str(tmp_path / "photo.png")], str(out_dir))
  assert [os.path.basename(p) for p in written] == ["photo_instances.png",
                                                     "photo_detections.json"]
  drawn = np.asarray(Image.open(out_dir / "photo_instances.png"))
  assert drawn.shape == (48, 80, 3) and (drawn != image).any()
  with open(out_dir / "photo_detections.json") as f:
    found = json.load(f)
  # 48 x 80 is resized to 38 x 64 on the 64-pixel canvas: x comes back
  # x 80 / 64, y x 48 / 38.
  assert found == [{"box": [10.0, 5.05, 50.0, 30.32], "score": 0.9, "class": 2,
                    "name": "rectangle"}]


def test_too_few_classes_is_a_data_error(shapes_dir, tmp_path, capsys):
  argv = ["train", "--config", os.path.join(REPO, "configs", "mask_rcnn_shapes.py:tiny"),
          "--workdir", str(tmp_path), f"--config.dataset={SMALL_DATASET}",
          f"--config.data_dir={shapes_dir}", "--config.num_classes=3"]
  assert cli.main(argv) == 2
  assert "num_classes counts the background" in capsys.readouterr().err


# --- evaluation of perfect detections ----------------------------------------

# A COCO-format split of 11 images (not a multiple of the 8-image batch nor
# of the 8 devices) of different stored sizes, which evaluation resizes to a
# 48-pixel short side (64 at most) on a 64 x 64 canvas: up, down, or not.
PERFECT_SIZES = [(40, 56), (64, 48), (30, 30), (72, 90), (50, 64), (64, 64),
                 (33, 80), (90, 45), (48, 48), (57, 41), (100, 70)]
PERFECT_IDS = [397, 139, 872, 285, 724, 6, 1000, 632, 776, 42, 90210]
M = 28  # the mask head's resolution


def _pattern(rng):
  """An M x M mask probability map: a soft ellipse filling its box."""
  v, u = np.meshgrid(np.linspace(-1, 1, M), np.linspace(-1, 1, M), indexing="ij")
  ax, ay = rng.uniform(0.7, 1.0, 2)
  return np.clip(1.3 - np.hypot(u / ax, v / ay), 0, 1).astype(np.float32)


_paste_frames = jax.jit(lambda boxes: paste_boxes(boxes, M))
# One compiled paste for every image size: a 128 x 128 frame, cropped.
_paste_one = jax.jit(lambda probs, box, size: paste_masks(probs[None], box[None],
                                                          (128, 128), size)[0])


def _robust_box(rng, h, w):
  """A box whose pasting frame (paste_boxes' integers) stays the same when its
  coordinates move by up to 0.01 px, as they do on the way to the canvas and
  back (float32 scaling)."""
  corners = np.array(np.meshgrid(*[[-0.01, 0.01]] * 4)).reshape(4, -1).T
  while True:
    bw, bh = rng.uniform(8, 0.7 * w), rng.uniform(8, 0.7 * h)
    x1, y1 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
    box = np.round([x1, y1, x1 + bw, y1 + bh], 2).astype(np.float32)
    if len({tuple(b) for b in np.asarray(_paste_frames(box + corners))}) == 1:
      return box


def _rle(mask):
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _write_coco(root, rng):
  """Writes val2017 (PERFECT_SIZES) and a one-image train2017 in COCO's layout.

  Every object's mask is what pasting its pattern into its box at the stored
  size gives (paste_masks, torchvision's semantics, thresholded at 0.5; it is
  compared with torchvision in tests/models/detection), so a mask head that
  answers the pattern is exactly right. Image 285 also has a crowd region.

  Returns:
    {image_id: [M x M pattern of each annotation, None for the crowd]}.
  """
  categories = [1, 3, 18, 44, 90]
  patterns = {}
  for folder, sizes, ids in (("val2017", PERFECT_SIZES, PERFECT_IDS),
                             ("train2017", [(32, 32)], [1])):
    records, annotations = [], []
    for (h, w), image_id in zip(sizes, ids):
      name = f"{image_id:012d}.jpg"
      os.makedirs(root / folder, exist_ok=True)
      Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(root / folder / name)
      records.append({"id": image_id, "file_name": name, "height": h, "width": w})
      patterns[image_id] = []
      for _ in range(rng.integers(1, 4)):
        box, pattern = _robust_box(rng, h, w), _pattern(rng)
        mask = np.asarray(_paste_one(pattern, box, np.array([h, w], np.int32)))[:h, :w]
        patterns[image_id].append(pattern)
        annotations.append(
            {"image_id": image_id, "category_id": int(rng.choice(categories)),
             "iscrowd": 0, "segmentation": _rle(mask), "area": float(mask.sum()),
             "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]),
                      float(box[3] - box[1])]})
      if image_id == 285:  # Missing a crowd region is no miss.
        crowd = np.zeros((h, w), np.uint8)
        crowd[50:70, 60:90] = 1
        patterns[image_id].append(None)
        annotations.append({"image_id": image_id, "category_id": 1, "iscrowd": 1,
                            "segmentation": _rle(crowd), "area": 600.0,
                            "bbox": [60.0, 50.0, 30.0, 20.0]})
    for i, ann in enumerate(annotations):
      ann["id"] = i + 1
    os.makedirs(root / "annotations", exist_ok=True)
    with open(root / "annotations" / f"instances_{folder}.json", "w") as f:
      json.dump({"images": records, "annotations": annotations,
                 "categories": [{"id": i, "name": n} for i, n in coco.CATEGORIES]}, f)
  return patterns


@pytest.fixture(scope="module")
def perfect_coco(tmp_path_factory):
  """(data_dir of a prepared coco_instances, the objects' mask patterns)."""
  data_dir = tmp_path_factory.mktemp("coco_tfds")
  manual = tmp_path_factory.mktemp("coco_manual")
  patterns = _write_coco(manual, np.random.default_rng(0))
  builders.load_builder("coco_instances", str(data_dir), manual_dir=str(manual))
  return str(data_dir), patterns


def _perfect_config(data_dir, mode, config="mask_rcnn_shapes.py", grouped=False):
  # Grouped: landscape images on 32 x 64, portrait ones on 64 x 32.
  canvas = ["instances.min_size=(32,)", "instances.canvas=()",
            "instances.group_by_aspect=True"] if grouped else [
            "instances.min_size=(48,)", "instances.canvas=64,64"]
  return config_lib.load_config(
      os.path.join(REPO, "configs", f"{config}:tiny"),
      ["dataset=coco_instances", f"data_dir={data_dir}", "num_classes=81",
       "instances.max_size=64", *canvas, "eval.batch_size=8", f"parallel.mode={mode}"])


def _canvas_ground_truth(config, patterns):
  """Each image's non-crowd ground truth as the evaluation batches carry it,
  in the resized image's canvas pixels, with its mask pattern: the answer of
  a perfect detector. Returns {image_id: (boxes, classes, valid, patterns)}."""
  truth, resized = {}, 0
  for batch in instances.eval_batches(config, split="validation"):
    for i in np.flatnonzero(batch["mask"]):
      image_id = int(batch["image_id"][i])
      valid = batch["valid"][i] & ~batch["crowd"][i]
      probs = np.zeros((len(valid), M, M), np.float32)
      for row, pattern in enumerate(patterns[image_id]):
        if pattern is not None:
          probs[row] = pattern
      truth[image_id] = (batch["boxes"][i], batch["classes"][i], valid, probs)
      resized += not np.array_equal(batch["image_size"][i], batch["orig_size"][i])
  assert sorted(truth) == sorted(PERFECT_IDS)
  # Most images change size on the canvas, so boxes and masks that were not
  # mapped back to the stored size would not match.
  assert resized >= 8
  return truth


def _perfect_detect_step(truth, answer_for, masks=True):
  """A stand-in for tasks.instance.detect_step (same signature, compiled and sharded
  the same way by the Trainer) whose detections for the image with id i are
  image answer_for[i]'s ground truth, score 1, in canvas pixels (with masks:
  their mask patterns too). Padding slots (image_id -1) get the first
  image's answer: only the batch's "mask" may keep them out of the score."""
  ids = np.array(list(answer_for), np.int32)
  table = [np.stack([truth[answer_for[i]][k] for i in answer_for]) for k in range(4)]

  def detect_step(state, batch, *, model, axis_name=None):
    del state, model, axis_name
    detect_step.traces.append(batch["image"].shape[-3:-1])  # once per compilation
    row = jnp.argmax(batch["image_id"][:, None] == ids[None, :], axis=1)
    boxes, classes, valid, probs = (jnp.asarray(t)[row] for t in table)
    passed = {k: batch[k] for k in ("image_size", "image_id", "orig_size", "mask")}
    out = {**passed, "boxes": boxes, "scores": valid.astype(jnp.float32),
           "classes": classes, "valid": valid}
    return {**out, "mask_probs": probs} if masks else out
  detect_step.traces = []
  return detect_step


def _evaluate_with(config, tmp_path, monkeypatch, detect_step, num_devices):
  monkeypatch.setattr(instance, "detect_step", detect_step)
  with loop.Trainer(config, str(tmp_path), devices=jax.devices()[:num_devices]) as trainer:
    # The state only reaches the stand-in, which ignores it.
    return trainer.evaluate(None, "validation")


# 8 devices: a batch of 8 real images, then 3 real and 5 padding; 3 devices,
# a canvas per orientation: batches rounded up to 9, 7 landscape and square
# images and 2 padding, then 4 portrait and 5 padding; 1 device: as 8.
# Faster R-CNN's config: the same evaluation, of boxes alone.
@pytest.mark.parametrize("num_devices,mode,config,grouped", [
    (8, "jit", "mask_rcnn_shapes.py", False), (3, "pmap", "mask_rcnn_shapes.py", True),
    (1, "jit", "mask_rcnn_shapes.py", False), (8, "jit", "faster_rcnn_shapes.py", False)])
def test_perfect_detections_score_ap_one(perfect_coco, tmp_path, monkeypatch,
                                         num_devices, mode, config, grouped):
  """The evaluation `segjax train` and `segjax eval` run for detectors, on
  any number of devices with a padded last batch, gives box and mask AP 1.0
  (box AP alone without masks) to a detector that answers the ground truth
  in the canvas frame; the same answers given to the wrong images score
  near 0. So image ids, padding, and the mapping of boxes and masks back to
  each image's stored size are right, also from the orientation canvases,
  which compile once each."""
  data_dir, patterns = perfect_coco
  config = _perfect_config(data_dir, mode, config, grouped)
  masks = config.model.startswith("mask_rcnn")
  kinds = ("box", "mask") if masks else ("box",)
  truth = _canvas_ground_truth(config, patterns)
  step = _perfect_detect_step(truth, {i: i for i in PERFECT_IDS}, masks)
  right = _evaluate_with(config, tmp_path / "right", monkeypatch, step, num_devices)
  assert step.traces == ([(32, 64), (64, 32)] if grouped else [(64, 64)])
  assert right["num_images"] == len(PERFECT_IDS)
  assert any(k.startswith("mask_") for k in right) == masks
  for key in (f"{kind}_{stat}" for kind in kinds for stat in ("ap", "ap75", "ar100")):
    assert right[key] == 1.0, (key, right[key])
  shifted = dict(zip(PERFECT_IDS, PERFECT_IDS[1:] + PERFECT_IDS[:1]))
  wrong = _evaluate_with(config, tmp_path / "wrong", monkeypatch,
                         _perfect_detect_step(truth, shifted, masks), num_devices)
  assert all(wrong[f"{kind}_ap"] < 0.2 for kind in kinds), wrong
