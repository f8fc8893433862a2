"""Joint image/label transforms: geometry, ignore padding, determinism."""
import numpy as np
import pytest
import tensorflow as tf

from segjax import errors
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
