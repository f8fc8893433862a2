"""The Mask R-CNN input pipeline: fixed shapes, joint transforms against numpy
references, deterministic resumable streams, exact padded evaluation, and
the same on a canvas per orientation."""
import itertools
import json

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import fake_downloads as fake
import test_builders_coco as coco_fake
from conftest import SMALL_DATASET
from segjax.data import builders, groups, instances, mask_crops, transforms
from segjax.data.builders import coco, shapes
from segjax.errors import ConfigError, DataError


def _config(data_dir, dataset=SMALL_DATASET, **overrides):
  """A plain ConfigDict with the keys the pipeline reads (no trainer keys)."""
  inst = dict(max_instances=4, min_size=(48, 64), max_size=64, canvas=(64, 64),
              size_divisibility=32, flip=True, drop_crowd=True)
  inst.update(overrides)
  return ml_collections.ConfigDict(dict(
      seed=0, dataset=dataset, data_dir=data_dir, num_classes=4,
      train=dict(batch_size=4), eval=dict(batch_size=6, split="validation"),
      augment=dict(mean=transforms.IMAGENET_MEAN, std=transforms.IMAGENET_STD),
      data=dict(num_shards=0, shuffle_buffer=2048, prefetch=2,
                skip_bad_examples=False),
      instances=inst))


def _example(h, w, boxes, labels, crowd=None, seed=0):
  """A tfds-like example whose masks fill their integer boxes exactly."""
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  k = len(boxes)
  # tfds decodes an empty Sequence of (None, None, 1) images as [0, 0, 0, 1].
  masks = np.zeros((k, h, w, 1) if k else (0, 0, 0, 1), np.uint8)
  for mask, (x1, y1, x2, y2) in zip(masks, boxes.astype(int)):
    mask[y1:y2, x1:x2] = 1
  image = np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)
  objects = {"mask": masks, "bbox": boxes, "label": np.asarray(labels, np.int64),
             "is_crowd": np.zeros(k, bool) if crowd is None else np.asarray(crowd)}
  return tf.nest.map_structure(tf.constant, {"image": image, "objects": objects,
                                             "image_id": np.int64(7)})


def _numpy(ex):
  return tf.nest.map_structure(lambda t: t.numpy(), ex)


def _paste(crops, boxes, hw):
  """uint8 [..., h, w] masks from crops [..., M, M] over boxes [..., 4]: a
  pixel is in where the crop pixel under its centre is at least half on."""
  crops, boxes = np.asarray(crops), np.asarray(boxes, np.float64)
  m = crops.shape[-1]
  ys, xs = np.arange(hw[0]) + 0.5, np.arange(hw[1]) + 0.5
  out = np.zeros(crops.shape[:-2] + tuple(hw), np.uint8)
  for index in np.ndindex(crops.shape[:-2]):
    x1, y1, x2, y2 = boxes[index]
    if x2 <= x1 or y2 <= y1:
      continue
    col = np.floor((xs - x1) * m / (x2 - x1)).astype(int)
    row = np.floor((ys - y1) * m / (y2 - y1)).astype(int)
    inside = (row[:, None] >= 0) & (row[:, None] < m) & (col >= 0) & (col < m)
    values = crops[index][np.clip(row, 0, m - 1)[:, None], np.clip(col, 0, m - 1)]
    out[index] = inside & (values >= 128)
  return out


def _mask_boxes(masks):
  """float32 [..., 4] tight (x1, y1, x2, y2) boxes of masks [..., H, W]; 0 if empty."""
  rows, cols = masks.any(-1), masks.any(-2)

  def span(a):
    first = np.argmax(a, -1)
    last = a.shape[-1] - np.argmax(a[..., ::-1], -1)
    return np.where(a.any(-1), first, 0), np.where(a.any(-1), last, 0)
  (x1, x2), (y1, y2) = span(cols), span(rows)
  return np.stack([x1, y1, x2, y2], -1).astype(np.float32)


# crop_masks' margin as a box offset: crop boxes are the boxes grown by it.
GROW = mask_crops.CROP_MARGIN * np.float32([-1, -1, 1, 1])
BOXES = [[2, 3, 9, 8], [0, 0, 4, 20], [10, 5, 16, 12], [5, 10, 16, 20],
         [1, 1, 3, 3]]


@pytest.mark.parametrize("k", [0, 2, 5])
def test_instance_example_pads_and_marks_valid(k):
  g, m = 3, mask_crops.MASK_CROP_SIZE
  example = _example(20, 16, BOXES[:k], np.arange(k) % 3)
  ex = _numpy(instances.instance_example(example, max_instances=g))
  n = min(k, g)
  assert ex["boxes"].shape == (g, 4) and ex["boxes"].dtype == np.float32
  assert ex["classes"].shape == (g,) and ex["classes"].dtype == np.int32
  assert ex["mask_crops"].shape == (g, m, m) and ex["mask_crops"].dtype == np.uint8
  assert "masks" not in ex
  np.testing.assert_array_equal(ex["valid"], np.arange(g) < n)
  np.testing.assert_array_equal(ex["classes"], [1, 2, 3][:n] + [0] * (g - n))
  np.testing.assert_array_equal(ex["boxes"][:n], np.reshape(BOXES[:n], (n, 4)))
  np.testing.assert_array_equal(ex["mask_boxes"][:n], ex["boxes"][:n] + GROW)
  # The masks fill their boxes: the crops are on well inside them (soft
  # only at the edge, bilinear between pixel centres) and paste back.
  assert (ex["mask_crops"][:n, 40:-40, 40:-40] == 255).all()
  full = _numpy(instances.instance_example(example, max_instances=g, mask_size=None))
  assert full["masks"].shape == (g, 20, 16) and full["masks"].dtype == np.uint8
  np.testing.assert_array_equal(_mask_boxes(full["masks"]), ex["boxes"])
  np.testing.assert_array_equal(_paste(ex["mask_crops"], ex["mask_boxes"], (20, 16)),
                                full["masks"])
  assert not ex["boxes"][n:].any() and not ex["mask_crops"][n:].any()
  assert not ex["mask_boxes"][n:].any()
  assert ex["num_dropped"] == max(k - g, 0) and ex["image_id"] == 7


def test_crowd_and_degenerate_instances():
  boxes = [[2, 3, 9, 8], [0, 0, 4, 20], [5, 5, 5, 9], [10, 5, 30, 12]]
  example = _example(20, 16, boxes[:2] + [[0, 0, 1, 1]] * 2, [0, 1, 2, 0],
                     crowd=[False, True, False, False])
  # A zero-width box and one reaching past the image (clipped to x2 = 16).
  example["objects"]["bbox"] = tf.constant(boxes, tf.float32)
  dropped = _numpy(instances.instance_example(example, 4))
  np.testing.assert_array_equal(dropped["valid"], [True, True, False, False])
  np.testing.assert_array_equal(dropped["classes"], [1, 1, 0, 0])
  np.testing.assert_array_equal(dropped["boxes"][1], [10, 5, 16, 12])
  assert not dropped["crowd"].any()
  kept = _numpy(instances.instance_example(example, 4, drop_crowd=False))
  np.testing.assert_array_equal(kept["crowd"], [False, True, False, False])
  np.testing.assert_array_equal(kept["classes"], [1, 2, 1, 0])


def _reference_size(h, w, min_size, max_size, canvas):
  """GeneralizedRCNNTransform's scale, capped by the canvas, rounded half up."""
  scale = min(min_size / min(h, w), max_size / max(h, w), canvas[0] / h,
              canvas[1] / w)
  return max(int(np.floor(h * scale + 0.5)), 1), max(int(np.floor(w * scale + 0.5)), 1)


@pytest.mark.parametrize("h,w,min_size,max_size,canvas", [
    (480, 640, 800, 1333, (1344, 1344)), (640, 480, 800, 1333, (1344, 1344)),
    (100, 1000, 800, 1333, (1344, 1344)), (427, 640, 640, 1333, (1344, 1344)),
    (333, 500, 800, 1000, (800, 1024)), (8, 10, 16, 32, (32, 32)),
    (64, 64, 80, 200, (64, 96)), (1, 300, 5, 64, (32, 64))])
def test_resized_size_matches_reference(h, w, min_size, max_size, canvas):
  size = instances.resized_size(tf.constant([h, w]), min_size, max_size, canvas)
  assert tuple(size.numpy()) == _reference_size(h, w, min_size, max_size, canvas)
  nh, nw = size.numpy()
  assert nh <= canvas[0] and nw <= canvas[1] and max(nh, nw) <= max_size


def test_resize_scales_boxes_and_masks_with_the_image():
  example = _example(30, 40, BOXES[:4], [0, 1, 2, 0])
  ex = instances.select_instances(example, 4, mask_size=None)
  ex = {**instances.select_instances(example, 4), "masks": ex["masks"]}
  out = _numpy(instances.resize(ex, 45, 100, (64, 64)))
  nh, nw = _reference_size(30, 40, 45, 100, (64, 64))  # scale 1.5 -> 45 x 60
  assert out["image"].shape == (nh, nw, 3) and out["masks"].shape == (4, nh, nw)
  expected = np.asarray(BOXES[:4], np.float32) * [nw / 40, nh / 30, nw / 40, nh / 30]
  np.testing.assert_allclose(out["boxes"], expected, rtol=1e-6)
  # Nearest resizing moves a mask edge by at most half an output pixel.
  np.testing.assert_allclose(_mask_boxes(out["masks"]), expected, atol=1.0)
  assert set(np.unique(out["masks"])) == {0, 1}
  # Crops are box-relative: only their boxes scale.
  np.testing.assert_array_equal(out["mask_crops"], ex["mask_crops"].numpy())
  ratio = np.float32([nw / 40, nh / 30] * 2)
  np.testing.assert_allclose(out["mask_boxes"], (BOXES[:4] + GROW) * ratio, rtol=1e-6)


def test_flip_moves_boxes_and_masks_with_the_image():
  example = _example(20, 16, BOXES[:2], [0, 1])
  ex = instances.instance_example(example, 3, mask_size=None)
  ex = {**instances.instance_example(example, 3), "masks": ex["masks"]}
  out, before = _numpy(instances.hflip(ex)), _numpy(ex)
  np.testing.assert_array_equal(out["image"], before["image"][:, ::-1])
  np.testing.assert_array_equal(out["masks"], before["masks"][:, :, ::-1])
  np.testing.assert_array_equal(out["mask_crops"], before["mask_crops"][:, :, ::-1])
  x1, y1, x2, y2 = before["boxes"][:2].T
  np.testing.assert_array_equal(out["boxes"][:2], np.stack([16 - x2, y1, 16 - x1, y2], -1))
  np.testing.assert_array_equal(out["mask_boxes"][:2], out["boxes"][:2] + GROW)
  np.testing.assert_array_equal(_mask_boxes(out["masks"]), out["boxes"])
  np.testing.assert_array_equal(_paste(out["mask_crops"], out["mask_boxes"], (20, 16)),
                                out["masks"])
  assert not out["boxes"][2].any() and not out["mask_boxes"][2].any()  # Padding stays zero.


def _shapes_example(index, size):
  """Scene `index` of segjax_shapes' training split at size^2, as tfds gives it."""
  scene = shapes.render_example(0, 0, index, size)
  objects = {"mask": scene["masks"][..., None].astype(np.uint8), "bbox": scene["boxes"],
             "label": (scene["labels"] - 1).astype(np.int64)}
  return tf.nest.map_structure(tf.constant, {"image": scene["image"], "objects": objects})


def _with_masks(example, g):
  """select_instances' crops and the image-sized masks of the same rows."""
  full = instances.select_instances(example, g, mask_size=None)
  return {**instances.select_instances(example, g), "masks": full["masks"]}


def test_train_transform_is_seeded_static_and_consistent():
  s = instances.settings(_config("", min_size=(16, 24), max_size=40,
                                 canvas=(32, 32), max_instances=3))
  ex = _with_masks(_example(20, 16, BOXES[:2], [0, 1]), 3)
  m = mask_crops.MASK_CROP_SIZE
  draws = set()
  for seed in range(16):  # Scale 1 or 1.5 (short side 16 -> 24), flip or not.
    out = _numpy(instances.train_transform(ex, tf.constant([seed, 5]), s))
    again = _numpy(instances.train_transform(ex, tf.constant([seed, 5]), s))
    for key in out:
      np.testing.assert_array_equal(out[key], again[key])
    assert out["image"].shape == (32, 32, 3) and out["masks"].shape == (3, 32, 32)
    assert out["mask_crops"].shape == (3, m, m) and out["mask_boxes"].shape == (3, 4)
    h, w = out["image_size"]
    assert (h, w) in ((20, 16), (30, 24))
    assert not out["image"][h:].any() and not out["image"][:, w:].any()
    assert not out["masks"][:, h:].any() and not out["masks"][:, :, w:].any()
    np.testing.assert_allclose(_mask_boxes(out["masks"]), out["boxes"], atol=1.0)
    grown = out["boxes"] + GROW * np.float32([w / 16, h / 20] * 2)
    np.testing.assert_allclose(out["mask_boxes"][:2], grown[:2], atol=1e-5)
    scale = w / 16
    flipped = out["boxes"][0, 0] != 2 * scale  # Box 0 starts at x = 2.
    if flipped:
      np.testing.assert_allclose(out["boxes"][0], [w - 9 * scale, 3 * scale,
                                                   w - 2 * scale, 8 * scale])
    draws.add((scale, flipped))
  assert len(draws) == 4  # Both scales, flipped and not.


def test_crops_follow_resize_and_flip_as_the_full_masks_do():
  """The pipeline's crops pasted through their boxes are the image-sized
  masks it resizes (nearest) and flips, but for pixels on an edge (in
  the image: a crop reads a mask as torchvision does, up to half a pixel
  past the image)."""
  s = instances.settings(_config("", min_size=(96, 128), max_size=128,
                                 canvas=(128, 128), max_instances=6))
  draws, agree = set(), []
  for index in range(4):
    ex = _with_masks(_shapes_example(index, 64), s.max_instances)
    for seed in range(3):
      out = _numpy(instances.train_transform(ex, tf.constant([index, seed]), s))
      h, w = out["image_size"]
      pasted = _paste(out["mask_crops"], out["mask_boxes"], (h, w))
      for j in np.flatnonzero(out["valid"]):
        a, b = pasted[j].astype(bool), out["masks"][j, :h, :w].astype(bool)
        # Nearest resizing puts an edge up to half a stored pixel off; the
        # crops disagree with it nowhere else.
        assert not ((a ^ b) & ~(_near(b) & _near(~b))).any()
        agree.append((a & b).sum() / (a | b).sum())
      scale = out["image_size"][1] / 64
      flipped = not np.allclose(out["mask_boxes"][0], ex["mask_boxes"][0] * scale)
      draws.add((scale, flipped))
  assert len(draws) == 4  # Scales 1.5 and 2, flipped and not.
  assert np.mean(agree) > 0.97, agree  # IoU of pasted crop and mask


def _near(mask):
  """bool [H, W]: the pixels of mask and their 4 neighbours."""
  out = mask.copy()
  out[1:] |= mask[:-1]
  out[:-1] |= mask[1:]
  out[:, 1:] |= mask[:, :-1]
  out[:, :-1] |= mask[:, 1:]
  return out


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _check_batch(batch, config):
  s = instances.settings(config)
  b, g, (hc, wc) = config.train.batch_size, s.max_instances, s.canvas
  m = mask_crops.MASK_CROP_SIZE
  expected = {"image": ((b, hc, wc, 3), np.float32), "image_size": ((b, 2), np.int32),
              "boxes": ((b, g, 4), np.float32), "classes": ((b, g), np.int32),
              "mask_crops": ((b, g, m, m), np.uint8), "mask_boxes": ((b, g, 4), np.float32),
              "valid": ((b, g), np.bool_),
              "crowd": ((b, g), np.bool_), "num_dropped": ((b,), np.int32),
              "image_id": ((b,), np.int64)}
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
  valid, boxes = batch["valid"], batch["boxes"]
  h, w = batch["image_size"][:, None, 0], batch["image_size"][:, None, 1]
  assert (boxes >= 0).all() and (boxes[..., 2] <= w).all() and (boxes[..., 3] <= h).all()
  assert ((boxes[..., 2] > boxes[..., 0]) == valid).all()
  assert ((batch["classes"] > 0) == valid).all() and not batch["mask_crops"][~valid].any()
  # Crop boxes: the boxes grown by the same margin on each side.
  grown = batch["mask_boxes"] - boxes
  np.testing.assert_allclose(grown[..., :2], -grown[..., 2:], atol=1e-4)
  assert (grown[valid][:, 2:] > 0).all() and not batch["mask_boxes"][~valid].any()
  assert (batch["mask_crops"][valid].max((1, 2)) > 0).all()


def test_train_batches_are_deterministic_resumable_and_static(shapes_dir):
  config = _config(shapes_dir)
  # 48 training examples, 4 a step: step 12 starts the second epoch.
  full = _take(instances.train_batches(config, process_index=0, process_count=1), 14)
  again = _take(instances.train_batches(config, process_index=0, process_count=1), 2)
  resumed = _take(instances.train_batches(config, start_step=11, process_index=0,
                                          process_count=1), 3)
  for a, b in zip(full, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  for a, b in zip(full[11:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  for batch in full:
    _check_batch(batch, config)
  counts = np.concatenate([b["valid"].sum(1) for b in full])
  dropped = np.concatenate([b["num_dropped"] for b in full])
  assert counts.min() >= 1 and counts.max() == 4 and dropped.max() >= 1
  assert ((dropped == 0) | (counts == 4)).all()
  sizes = {tuple(s) for b in full for s in b["image_size"]}
  assert sizes == {(48, 48), (64, 64)}  # Multi-scale: both min_size values.
  classes = np.concatenate([b["classes"][b["valid"]] for b in full])
  assert set(np.unique(classes)) == {1, 2, 3}


def test_train_batches_do_not_depend_on_process_count(shapes_dir):
  config = _config(shapes_dir, max_instances=2)
  config.data.num_shards = 2
  single = _take(instances.train_batches(config, process_index=0, process_count=1), 2)
  hosts = [_take(instances.train_batches(config, process_index=i, process_count=2), 2)
           for i in range(2)]
  for step, whole in enumerate(single):
    for key in whole:
      joined = np.concatenate([hosts[0][step][key], hosts[1][step][key]])
      np.testing.assert_array_equal(joined, whole[key])


@pytest.mark.parametrize("process_count,local_devices", [(1, 1), (2, 2)])
def test_eval_batches_cover_each_example_once(shapes_dir, process_count, local_devices):
  config = _config(shapes_dir)
  ids, batch_counts = [], []
  for index in range(process_count):
    batches = list(instances.eval_batches(config, process_index=index,
                                          process_count=process_count,
                                          local_devices=local_devices))
    batch_counts.append(len(batches))
    for batch in batches:
      real = batch["mask"] == 1
      assert batch["image"].shape[0] % local_devices == 0
      assert (batch["image_id"][~real] == -1).all() and not batch["valid"][~real].any()
      assert (batch["orig_size"][real] == 64).all()
      assert (batch["image_size"][real] == 64).all()  # The last min_size.
      ids.extend(batch["image_id"][real].tolist())
  assert len(set(batch_counts)) == 1
  assert sorted(ids) == list(range(16))


def test_class_and_config_errors(shapes_dir):
  with pytest.raises(ConfigError, match="multiples of size_divisibility=32"):
    instances.settings(_config(shapes_dir, canvas=(64, 80)))
  with pytest.raises(ConfigError, match="must be positive"):
    instances.settings(_config(shapes_dir, max_instances=0))
  with pytest.raises(ConfigError, match=r"unknown config.instances keys \['min_sizes'\]"):
    instances.settings(_config(shapes_dir, min_sizes=(32,)))
  config = _config(shapes_dir)
  config.num_classes = 3  # K = 3 shapes need K + 1 = 4.
  with pytest.raises(DataError, match=r"instance classes \[3\].*num_classes=3"):
    next(instances.train_batches(config, process_index=0, process_count=1))


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
  """coco_instances prepared from test_builders_coco's fake download: train
  139 (person, car, crowd person), 285 (none), 632 (toothbrush); validation
  724 and 776 (toothbrush); all 8 x 10."""
  root = tmp_path_factory.mktemp("inst_coco_manual")
  for folder, images in (("train2017", coco_fake.TRAIN), ("val2017", coco_fake.VAL)):
    for name in images.values():
      fake.write_image(root / folder / name, fake.solid(8, 10, (250, 200, 10)))
    path = root / "annotations" / f"instances_{folder}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(coco_fake._instances_json(images)))
  data_dir = tmp_path_factory.mktemp("inst_coco")
  fake.build(coco.CocoInstances, data_dir, root)
  return str(data_dir)


def test_coco_end_to_end(coco_dir):
  config = _config(coco_dir, "coco_instances", min_size=16, max_size=32,
                   canvas=(32, 32), max_instances=3, flip=False)
  config.num_classes, config.train.batch_size = 81, 3
  batch = next(instances.train_batches(config, process_index=0, process_count=1))
  by_id = {int(i): k for k, i in enumerate(batch["image_id"])}
  assert set(by_id) == {139, 285, 632}
  first, empty, brush = by_id[139], by_id[285], by_id[632]
  np.testing.assert_array_equal(batch["classes"][first], [1, 3, 0])  # crowd dropped
  np.testing.assert_array_equal(batch["boxes"][first, :2],
                                [[2, 2, 10, 10], [12, 10, 18, 16]])  # x 2 (8x10 -> 16x20)
  assert not batch["valid"][empty].any() and not batch["mask_crops"][empty].any()
  np.testing.assert_array_equal(batch["classes"][brush], [80, 0, 0])
  assert (batch["image_size"] == [16, 20]).all()
  masks = _paste(batch["mask_crops"][first, :2], batch["mask_boxes"][first, :2], (32, 32))
  np.testing.assert_allclose(_mask_boxes(masks), batch["boxes"][first, :2], atol=1.0)
  # Evaluation keeps the crowd region, flagged.
  config.eval.batch_size = 2
  evals = list(instances.eval_batches(config, process_index=0, process_count=1,
                                      split="train"))
  ids = np.concatenate([b["image_id"] for b in evals])
  rows = {int(i): (b, k) for b in evals for k, i in enumerate(b["image_id"])}
  assert sorted(ids.tolist()) == [-1, 139, 285, 632]
  b, k = rows[139]
  np.testing.assert_array_equal(b["crowd"][k], [False, False, True])
  np.testing.assert_array_equal(b["classes"][k], [1, 3, 1])
  np.testing.assert_array_equal(b["orig_size"][k], [8, 10])


# --- a canvas per orientation (group_by_aspect) -------------------------------


def test_a_group_decodes_its_examples_as_tfds_does(coco_dir):
  """groups.members_only leaves images encoded until its filter; what it
  keeps equals tfds' own decoding, also for image 285 without objects."""
  builder = builders.load_builder("coco_instances", coco_dir)
  whole = list(tfds.as_numpy(builder.as_dataset(split="train", shuffle_files=False)))
  assert [len(ex["objects"]["label"]) for ex in whole].count(0) == 1
  for member in ([True, True, True], [False, True, True], [True, False, False]):
    kept = list(tfds.as_numpy(groups.members_only(builder, "train", np.array(member))))
    want = [ex for ex, m in zip(whole, member) if m]
    assert len(kept) == len(want)
    for a, b in zip(kept, want):
      for x, y in zip(tf.nest.flatten(a), tf.nest.flatten(b)):
        np.testing.assert_array_equal(x, y)
        assert np.asarray(x).dtype == np.asarray(y).dtype


@pytest.fixture(scope="module")
def mixed_coco_dir(tmp_path_factory):
  """coco_instances from fake_downloads' COCO download: train 12 images, 8
  landscape (48 x 64, 43 x 64) and 4 portrait (64 x 48); validation 5, 3
  landscape and 2 portrait. In read order, halves of train both hold
  portrait images; of validation, the first half holds only landscape."""
  root = tmp_path_factory.mktemp("mixed_coco_manual")
  download = fake.coco_download(root, train=12, val=5)
  data_dir = str(tmp_path_factory.mktemp("mixed_coco"))
  builders.load_builder(download.dataset, data_dir, manual_dir=str(root))
  return data_dir


def _grouped_config(data_dir):
  config = _config(data_dir, "coco_instances/instances", min_size=(32,), max_size=64,
                   canvas=(), group_by_aspect=True)
  config.num_classes, config.train.batch_size = 81, 2
  config.data.num_shards = 2
  return config


def _orientation_canvas(batch):
  """The batch's canvas, after checking every real image's orientation fits it."""
  canvas = batch["image"].shape[1:3]
  assert canvas in ((32, 64), (64, 32))
  real = batch["mask"] == 1 if "mask" in batch else slice(None)
  h, w = batch["image_size"][real].T
  assert ((h <= w) if canvas == (32, 64) else (h > w)).all()
  return canvas


def test_settings_give_a_canvas_per_orientation():
  def canvases(**inst):
    return instances.settings(ml_collections.ConfigDict({"instances": inst})).canvases
  assert canvases() == ((1344, 1344),)  # The default: one square canvas.
  assert canvases(group_by_aspect=True) == ((800, 1344), (1344, 800))
  assert canvases(group_by_aspect=True, min_size=(640, 672, 800)) == ((800, 1344),
                                                                      (1344, 800))
  assert canvases(group_by_aspect=True, min_size=(1400,)) == ((1344, 1344),) * 2
  assert canvases(group_by_aspect=True, canvas=(768, 1344)) == ((768, 1344), (1344, 768))
  with pytest.raises(ConfigError, match="landscape canvas of group_by_aspect"):
    canvases(group_by_aspect=True, canvas=(1344, 768))


def test_grouped_train_batches_keep_one_orientation_resume_and_ignore_hosts(
    mixed_coco_dir):
  config = _grouped_config(mixed_coco_dir)
  full = _take(instances.train_batches(config, process_index=0, process_count=1), 12)
  canvases = [_orientation_canvas(b) for b in full]
  # The deck keeps the split's proportions over every 12 steps (its size).
  assert canvases.count((32, 64)) == 8 and canvases.count((64, 32)) == 4
  assert set(np.concatenate([b["image_id"] for b in full])) == set(range(1000, 1012))
  # Two hosts resuming at step 5 read, together, what one host read from 0.
  hosts = [_take(instances.train_batches(config, start_step=5, process_index=i,
                                         process_count=2), 7)
           for i in range(2)]
  for step, batch in enumerate(full[5:]):
    for key in batch:
      joined = np.concatenate([hosts[0][step][key], hosts[1][step][key]])
      np.testing.assert_array_equal(joined, batch[key])
  # A shard without landscape images cannot fill the landscape batches.
  with pytest.raises(DataError, match="shard 1 of 2 .* has no landscape images"):
    next(instances.train_batches(config, process_index=0, process_count=1,
                                 split="validation"))


def test_grouped_eval_batches_cover_each_example_once(mixed_coco_dir):
  """Two hosts of two devices each: batches of 2, padded per orientation."""
  process_count, local_devices = 2, 2
  config = _grouped_config(mixed_coco_dir)
  config.eval.batch_size = 4
  ids, shapes = [], []
  for index in range(process_count):
    batches = list(instances.eval_batches(config, process_index=index,
                                          process_count=process_count,
                                          local_devices=local_devices))
    shapes.append([b["image"].shape for b in batches])
    for batch in batches:
      _orientation_canvas(batch)
      real = batch["mask"] == 1
      assert batch["image"].shape[0] % local_devices == 0
      assert (batch["image_id"][~real] == -1).all() and not batch["valid"][~real].any()
      ids.extend(batch["image_id"][real].tolist())
  # Every host meets the same shapes in the same order: landscape, then portrait.
  assert all(s == shapes[0] for s in shapes)
  canvases = [s[1:3] for s in shapes[0]]
  assert canvases == sorted(canvases) and len(set(canvases)) == 2
  assert sorted(ids) == list(range(1012, 1017))
