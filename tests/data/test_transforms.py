"""Joint image/label transforms: geometry, ignore padding, determinism; and
the key-generic ops under them (segjax.data.ops) on image, label, weight,
instance masks and boxes together."""
import numpy as np
import pytest
import tensorflow as tf

from segjax import errors
from segjax.data import normalization, ops
from segjax.data import transforms as T

H, W = 37, 53
OFFSET = 1000  # Coordinate labels start here, away from 0..255.


def _coordinate_example():
  """image[y, x] = (y, x, 7) and label[y, x] = OFFSET + y * W + x."""
  ys, xs = np.mgrid[0:H, 0:W]
  image = np.stack([ys, xs, np.full_like(ys, 7)], -1).astype(np.float32)
  label = (OFFSET + ys * W + xs).astype(np.int32)
  return {"image": tf.constant(image), "label": tf.constant(label),
          "key": tf.constant("kept")}


def _label_coords(label):
  """Decodes coordinate labels [h, w] to (y, x) arrays; -1 where not a coord."""
  label = np.asarray(label)
  valid = label >= OFFSET
  y = np.where(valid, (label - OFFSET) // W, -1)
  x = np.where(valid, (label - OFFSET) % W, -1)
  return y, x, valid


def _seed(i, j=0):
  return tf.constant([i, j], tf.int64)


def _assert_label_follows_image(ex, atol=0.0):
  image = ex["image"].numpy()
  y, x, valid = _label_coords(ex["label"])
  np.testing.assert_allclose(image[..., 0][valid], y[valid], atol=atol)
  np.testing.assert_allclose(image[..., 1][valid], x[valid], atol=atol)


def test_random_flip_moves_label_with_image():
  flipped = 0
  for i in range(12):
    out = T.random_flip(_coordinate_example(), _seed(i))
    _assert_label_follows_image(out)
    flipped += bool(out["image"].numpy()[0, 0, 1] == W - 1)
    assert out["key"].numpy() == b"kept"
  assert 0 < flipped < 12  # Both outcomes occur.


def test_random_crop_moves_label_with_image():
  offsets = set()
  for i in range(10):
    out = T.random_crop(_coordinate_example(), _seed(i), (16, 20))
    assert out["image"].shape == (16, 20, 3) and out["label"].shape == (16, 20)
    _assert_label_follows_image(out)
    y0, x0 = out["image"].numpy()[0, 0, :2]
    assert 0 <= y0 <= H - 16 and 0 <= x0 <= W - 20
    offsets.add((y0, x0))
  assert len(offsets) > 5


def test_random_crop_keeps_smaller_inputs_whole():
  out = T.random_crop(_coordinate_example(), _seed(0), (64, 20))
  assert out["image"].shape == (H, 20, 3)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_scale_label_nearest_follows_bilinear_image(seed):
  ex = T.random_scale(_coordinate_example(), _seed(seed), (0.5, 2.0))
  assert ex["image"].dtype == tf.float32 and ex["label"].dtype == tf.int32
  assert ex["image"].shape[:2] == ex["label"].shape
  # Nearest picks the source pixel within half a pixel of the sampled point.
  _assert_label_follows_image(ex, atol=0.5 + 1e-4)
  # No new values: every output label is an input label.
  y, x, valid = _label_coords(ex["label"])
  assert valid.all()


def test_random_scale_range_and_base_size():
  sizes = set()
  for i in range(8):
    out = T.random_scale(_coordinate_example(), _seed(i), (0.5, 2.0))
    h, w = out["label"].shape
    assert round(H * 0.5) - 1 <= h <= H * 2 + 1
    sizes.add((h, w))
  assert len(sizes) > 4
  # base_size (long, short) = (106, 100): factor 2 fits W=53 -> 106.
  out = T.random_scale(_coordinate_example(), _seed(0), (1.0, 1.0), (106, 100))
  assert out["label"].shape == (74, 106)


def test_nearest_interpolation_invents_no_labels():
  rng = np.random.default_rng(0)
  label = rng.choice(np.array([0, 3, 7, 255], np.uint8), (40, 40))
  ex = {"image": tf.zeros((40, 40, 3), tf.uint8), "label": tf.constant(label)}
  for i in range(6):
    out = T.train_transform(ex, _seed(i), 32, scale_range=(0.3, 2.5))
    assert set(np.unique(out["label"])) <= {0, 3, 7, 255}


def test_pad_to_size_fills_label_with_ignore():
  out = T.pad_to_size(_coordinate_example(), (50, 60), image_fill=-1)
  assert out["image"].shape == (50, 60, 3) and out["label"].shape == (50, 60)
  label, image = out["label"].numpy(), out["image"].numpy()
  assert (label[H:] == 255).all() and (label[:, W:] == 255).all()
  assert (image[H:] == -1).all() and (image[:, W:] == -1).all()
  _assert_label_follows_image({"image": out["image"][:H, :W],
                               "label": out["label"][:H, :W]})
  # Never crops.
  assert T.pad_to_size(_coordinate_example(), 8)["label"].shape == (H, W)


def test_train_transform_shapes_fixed_at_crop_size():
  for size, crop in [((20, 30), (32, 48)), ((100, 90), (32, 48))]:
    ex = {"image": tf.zeros(size + (3,), tf.uint8),
          "label": tf.ones(size + (1,), tf.uint8)}
    out = T.train_transform(ex, _seed(1), crop)
    assert out["image"].shape == crop + (3,)
    assert out["image"].dtype == tf.float32
    assert out["label"].shape == crop and out["label"].dtype == tf.int32


def test_train_transform_geometry_without_photometric():
  ex = _coordinate_example()
  for i in range(4):
    out = T.train_transform(ex, _seed(i), 24, scale_range=None,
                            photometric=False, mean=(0, 0, 0), std=(1, 1, 1))
    _assert_label_follows_image(out)


def test_same_seed_same_output_different_seed_differs():
  rng = np.random.default_rng(1)
  ex = {"image": tf.constant(rng.integers(0, 256, (48, 40, 3), np.uint8)),
        "label": tf.constant(rng.integers(0, 4, (48, 40), np.uint8))}
  a = T.train_transform(ex, _seed(5, 9), 32)
  b = T.train_transform(ex, _seed(5, 9), 32)
  c = T.train_transform(ex, _seed(5, 10), 32)
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.array_equal(a["image"], c["image"])


def test_deterministic_in_tf_data_pipeline():
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (4, 30, 30, 3), np.uint8)
  labels = rng.integers(0, 4, (4, 30, 30), np.uint8)

  def run():
    ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
    ds = ds.enumerate().map(
        lambda i, ex: T.train_transform(ex, tf.stack([tf.constant(7, tf.int64),
                                                      i]), 24),
        num_parallel_calls=2, deterministic=True)
    return [ex["image"] for ex in ds.as_numpy_iterator()]

  first, second = run(), run()
  for x, y in zip(first, second):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(first[0], first[1])


def test_photometric_distortion_changes_image_only():
  rng = np.random.default_rng(3)
  ex = {"image": tf.constant(rng.integers(0, 256, (16, 16, 3), np.uint8)),
        "label": tf.constant(rng.integers(0, 4, (16, 16), np.int32))}
  changed = 0
  for i in range(8):
    out = T.photometric_distortion(ex, _seed(i))
    image = out["image"].numpy()
    assert out["image"].dtype == tf.float32
    assert image.min() >= 0 and image.max() <= 255
    np.testing.assert_array_equal(out["label"], ex["label"])
    changed += not np.allclose(image, ex["image"].numpy(), atol=1e-3)
  assert changed >= 5  # All four steps skipped has chance 1/16 per seed.


def test_normalize_defaults_are_imagenet():
  mean = np.array(T.IMAGENET_MEAN, np.float32)
  image = tf.constant(np.broadcast_to(mean, (2, 2, 3)))
  out = T.normalize({"image": image, "label": tf.zeros((2, 2), tf.uint8)})
  np.testing.assert_allclose(out["image"], 0.0, atol=1e-5)
  assert out["label"].dtype == tf.int32
  with pytest.raises(errors.ConfigError):
    T.normalize({"image": image, "label": tf.zeros((2, 2))}, mean=(1, 2))


def test_eval_transform_resize_and_pad():
  ex = {"image": tf.zeros((20, 30, 3), tf.uint8),
        "label": tf.ones((20, 30), tf.uint8)}
  out = T.eval_transform(ex)
  assert out["image"].shape == (20, 30, 3) and out["label"].dtype == tf.int32
  out = T.eval_transform(ex, size=(10, 16))
  assert out["image"].shape == (10, 16, 3) and out["label"].shape == (10, 16)
  out = T.eval_transform(ex, pad_size=32)
  assert out["image"].shape == (32, 32, 3)
  assert (out["label"].numpy()[20:] == 255).all()
  out = T.eval_transform(ex, base_size=(60, 40))
  assert out["image"].shape == (40, 60, 3)


def test_validate_converts_channels_and_squeezes_label():
  label = tf.zeros((5, 6, 1), tf.uint8)
  grey = T.validate({"image": tf.fill((5, 6, 1), 9), "label": label})
  assert grey["image"].shape == (5, 6, 3) and (grey["image"].numpy() == 9).all()
  assert grey["label"].shape == (5, 6) and grey["label"].dtype == tf.int32
  rgba = tf.constant(np.arange(5 * 6 * 4).reshape(5, 6, 4), tf.int32)
  out = T.validate({"image": rgba, "label": label})
  np.testing.assert_array_equal(out["image"], rgba.numpy()[..., :3])


def test_validate_dynamic_channels():
  fn = tf.function(lambda image: T.validate(
      {"image": image, "label": tf.zeros(tf.shape(image)[:2], tf.int32)}),
      input_signature=[tf.TensorSpec([None, None, None], tf.uint8)])
  assert fn(tf.zeros((4, 4, 1), tf.uint8))["image"].shape == (4, 4, 3)
  assert fn(tf.zeros((4, 4, 4), tf.uint8))["image"].shape == (4, 4, 3)
  with pytest.raises(tf.errors.InvalidArgumentError, match="channels"):
    fn(tf.zeros((4, 4, 2), tf.uint8))


@pytest.mark.parametrize("image, label, match", [
    (tf.zeros((4, 4, 2)), tf.zeros((4, 4), tf.int32), "channels"),
    (tf.zeros((4, 4)), tf.zeros((4, 4), tf.int32), r"\[H, W, C\]"),
    (tf.zeros((4, 4, 3)), tf.zeros((4, 4)), "integer"),
    (tf.zeros((4, 4, 3)), tf.zeros((4, 5), tf.int32), "differ in size"),
    (tf.zeros((4, 4, 3)), tf.zeros((2, 4, 4), tf.int32), "label must be"),
])
def test_validate_rejects_bad_examples(image, label, match):
  with pytest.raises(errors.DataError, match=match):
    T.validate({"image": image, "label": label})


@pytest.mark.parametrize("size", [0, (3,), (4, -1), "big", 2.5])
def test_bad_sizes_raise_config_error(size):
  with pytest.raises(errors.ConfigError):
    T.random_crop(_coordinate_example(), _seed(0), size)


# --- key-generic ops: every key of one example moves together ---------------

CLASSES = (3, 1, 2)  # class of each instance of _instance_example


def _instance_example():
  """An example holding every kind of key: instances drawn as rectangles.

  masks [3, H, W] are the rectangles `boxes` [3, 4] (the last one partly
  under the second); label paints the masks' classes in order on 0;
  weight is 1 + label; image is random.
  """
  boxes = np.array([[4, 2, 20, 15], [30, 10, 53, 37], [25, 5, 41, 30]], np.float32)
  masks = np.zeros((3, H, W), np.uint8)
  label = np.zeros((H, W), np.int32)
  for k, (x1, y1, x2, y2) in enumerate(boxes.astype(int)):
    masks[k, y1:y2, x1:x2] = 1
    label[y1:y2, x1:x2] = CLASSES[k]
  image = np.random.default_rng(4).integers(0, 256, (H, W, 3), np.uint8)
  return {"image": tf.constant(image), "label": tf.constant(label),
          "weight": tf.constant(1.0 + label.astype(np.float32)),
          "masks": tf.constant(masks), "boxes": tf.constant(boxes),
          "image_size": tf.constant([H, W], tf.int32), "key": tf.constant("kept")}


def _bounding_boxes(masks):
  """[N, 4] (x1, y1, x2, y2) of each mask's pixels; zeros for empty masks."""
  out = np.zeros((len(masks), 4), np.float32)
  for k, mask in enumerate(np.asarray(masks)):
    ys, xs = np.nonzero(mask)
    if len(ys):
      out[k] = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
  return out


def _paint(masks, hw):
  label = np.zeros(hw, np.int32)
  for k, mask in enumerate(np.asarray(masks)[:, :hw[0], :hw[1]]):
    label[mask == 1] = CLASSES[k]
  return label


def _assert_consistent(ex, box_atol=0.0):
  """Masks, label and weight (where present) agree pixel for pixel on the
  real image; each box is its mask's bounding box (within box_atol)."""
  h, w = ex["image_size"].numpy()
  assert ex["image"].shape[:2] == ex["label"].shape
  assert ex["masks"].shape[1:] == ex["label"].shape
  label = ex["label"].numpy()
  np.testing.assert_array_equal(label[:h, :w], _paint(ex["masks"], (h, w)))
  if "weight" in ex:  # 1 + class on the image, 0 on padding (label 255)
    np.testing.assert_array_equal(ex["weight"], np.where(label == 255, 0, 1.0 + label))
  np.testing.assert_allclose(ex["boxes"], _bounding_boxes(ex["masks"]), atol=box_atol)
  assert ex["key"].numpy() == b"kept"


@pytest.mark.parametrize("hw", [(74, 106), (20, 17), (37, 53), (50, 31)])
def test_resize_treats_each_key_by_its_name(hw):
  out = ops.resize(_instance_example(), tf.constant(hw))
  assert out["image"].shape == hw + (3,) and out["image"].dtype == tf.float32
  assert out["masks"].dtype == tf.uint8 and out["label"].dtype == tf.int32
  np.testing.assert_array_equal(out["image_size"], hw)
  # Nearest invents no class, no weight and no mask value.
  assert set(np.unique(out["label"])) <= {0, *CLASSES}
  assert set(np.unique(out["masks"])) <= {0, 1}
  # Nearest samples the pixel within half a pixel of the scaled one, so a
  # mask's bounding box lies within half a pixel of its scaled box.
  _assert_consistent(out, box_atol=0.5 + 1e-4)
  box = np.array([4, 2, 20, 15]) * np.tile([hw[1] / W, hw[0] / H], 2)
  np.testing.assert_allclose(out["boxes"][0], box, rtol=1e-6)


def test_flip_crop_and_pad_keep_boxes_exactly_on_masks():
  ex = _instance_example()
  flipped = ops.flip_left_right(ex)
  _assert_consistent(flipped)
  np.testing.assert_array_equal(flipped["boxes"][0], [W - 20, 2, W - 4, 15])
  np.testing.assert_array_equal(flipped["image"], ex["image"].numpy()[:, ::-1])
  # The crop cuts the second and third boxes; a window beside the first
  # leaves it empty with a zero-area box.
  cropped = ops.crop(flipped, tf.constant([6, 9]), tf.constant([25, 30]))
  assert cropped["image"].shape == (25, 30, 3) and cropped["masks"].shape == (3, 25, 30)
  np.testing.assert_array_equal(cropped["image_size"], [25, 30])
  _assert_consistent(cropped)
  np.testing.assert_array_equal(cropped["boxes"][1], [0, 4, 14, 25])
  padded = ops.pad(cropped, (32, 40))
  np.testing.assert_array_equal(padded["image_size"], [25, 30])
  _assert_consistent(padded)
  label, masks = padded["label"].numpy(), padded["masks"].numpy()
  assert (label[25:] == 255).all() and (label[:, 30:] == 255).all()
  assert not masks[:, 25:].any() and not masks[:, :, 30:].any()
  assert not padded["image"].numpy()[25:].any()
  assert not padded["weight"].numpy()[25:].any()  # padding weighs nothing
  sized = ops.with_size(padded, 32, 40)
  assert sized["masks"].shape == (3, 32, 40) and sized["weight"].shape == (32, 40)


def test_flip_keeps_invalid_rows():
  ex = {**_instance_example(), "valid": tf.constant([True, False, True])}
  out = ops.flip_left_right(ex)
  np.testing.assert_array_equal(out["boxes"][1], ex["boxes"][1])
  np.testing.assert_array_equal(out["boxes"][2], [W - 41, 5, W - 25, 30])


def test_mask_crops_ride_along_with_their_unclipped_boxes():
  """Crops are box-relative: resize, crop and pad leave them as they are and
  move their boxes as "boxes" but without clipping; flips mirror both."""
  crops = np.random.default_rng(6).integers(0, 256, (3, 8, 8)).astype(np.uint8)
  grown = np.array([[-1, -1, 21, 16], [29, 9, 54, 38], [24, 4, 42, 31]], np.float32)
  ex = {**_instance_example(), "mask_crops": tf.constant(crops),
        "mask_boxes": tf.constant(grown)}
  resized = ops.resize(ex, tf.constant([2 * H, 2 * W]))
  np.testing.assert_array_equal(resized["mask_crops"], crops)
  np.testing.assert_allclose(resized["mask_boxes"], 2 * grown)
  flipped = ops.flip_left_right(ex)
  np.testing.assert_array_equal(flipped["mask_crops"], crops[:, :, ::-1])
  np.testing.assert_array_equal(flipped["mask_boxes"][0], [W - 21, -1, W + 1, 16])
  cropped = ops.crop(ex, tf.constant([6, 9]), tf.constant([25, 30]))
  np.testing.assert_array_equal(cropped["mask_crops"], crops)
  np.testing.assert_array_equal(cropped["mask_boxes"], grown - [9, 6, 9, 6])
  padded = ops.pad(ex, (64, 64))
  np.testing.assert_array_equal(padded["mask_crops"], crops)
  np.testing.assert_array_equal(padded["mask_boxes"], grown)


def test_random_flip_draws_once_for_every_key():
  outcomes = set()
  for i in range(12):
    out = ops.random_flip(_instance_example(), _seed(i))
    _assert_consistent(out)
    outcomes.add(bool(out["masks"].numpy()[0, 2, W - 5]))
  assert outcomes == {False, True}


def test_semantic_recipe_moves_instance_keys_too():
  """train_transform is built from the key-generic ops, so instance masks
  and boxes riding along an example follow its scale, crop and flip."""
  for i in range(6):
    ex = {k: v for k, v in _instance_example().items() if k != "weight"}
    out = T.train_transform(ex, _seed(i), (24, 32), (0.7, 1.6))
    assert out["masks"].shape == (3, 24, 32)
    _assert_consistent(out, box_atol=0.5 + 1e-4)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_numpy_normalize_equals_the_pipeline_op_bit_for_bit(dtype):
  image = np.random.default_rng(5).uniform(0, 255, (9, 7, 3)).astype(dtype)
  for mean, std in [(T.IMAGENET_MEAN, T.IMAGENET_STD), ((127.5,) * 3, (64,) * 3)]:
    op = ops.normalize({"image": tf.constant(image)}, mean, std)["image"].numpy()
    twin = normalization.normalize(image, mean, std)
    assert op.dtype == twin.dtype == np.float32
    assert op.tobytes() == twin.tobytes()
  for bad in [dict(mean=(1, 2)), dict(std=(1, 0, 1))]:
    with pytest.raises(errors.ConfigError):
      normalization.normalize(image, **{"mean": T.IMAGENET_MEAN,
                                        "std": T.IMAGENET_STD, **bad})
