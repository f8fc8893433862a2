"""tf.data ops that transform an image and its label map together.

Every op takes and returns an example dict

  {"image": uint8 or float [H, W, 3], "label": int32 [H, W], ...}

(`validate` brings other channel counts and [H, W, 1] labels to this form);
keys other than "image" and "label" pass through untouched. Labels use 255
as "ignore": padding writes it, and resizing labels is nearest-neighbour so
no label value is ever invented.

Random ops take a `seed`: an int32/int64 tensor [2], as for
`tf.random.stateless_uniform`. Each parameter is drawn once from it and
applied to image and label alike, so a pipeline that derives the seed from
(global seed, example index), e.g.

  ds = ds.enumerate().map(lambda i, ex: train_transform(
      ex, tf.stack([seed, i]), crop_size=512))

gives the same batches on every run and resumes exactly where it stopped.
Composite transforms split their seed (`stateless_split`), so the draws of
their steps are independent.
"""
from collections.abc import Sequence
import operator

import tensorflow as tf

from segjax import errors

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, 0..255 pixel scale
IMAGENET_STD = (58.395, 57.12, 57.375)
IGNORE_INDEX = 255

Example = dict[str, tf.Tensor]
Size = int | Sequence[int]


def validate(ex: Example) -> Example:
  """Checks an example and brings it to image [H, W, 3], label int32 [H, W].

  Images with 1 channel are tiled to RGB and RGBA images lose alpha; other
  channel counts and ranks raise. Labels [H, W, 1] are squeezed. Image and
  label must cover the same H, W (checked statically when shapes are known,
  else when the graph runs).

  Raises:
    DataError: for a wrong rank, channel count, label dtype or size mismatch
      that is visible in the static shapes.
  """
  image, label = ex["image"], ex["label"]
  if image.shape.rank != 3:
    raise errors.DataError(
        f"image must be [H, W, C], got shape {image.shape}. Decode images "
        "with 3 channels (or 1 or 4, which are converted); batch after the "
        "transforms, not before.")
  channels = image.shape[-1]
  if channels == 1:
    image = tf.tile(image, [1, 1, 3])
  elif channels == 4:
    image = image[..., :3]  # Alpha carries no class information.
  elif channels is None:
    count = tf.shape(image)[-1]
    check = tf.debugging.Assert(
        tf.reduce_any(tf.equal(count, [1, 3, 4])),
        ["image must have 1, 3 or 4 channels, got", count])
    with tf.control_dependencies([check]):
      image = tf.cond(tf.equal(count, 1),
                      lambda: tf.tile(image[..., :1], [1, 1, 3]),
                      lambda: image[..., :3])
    image.set_shape([None, None, 3])
  elif channels != 3:
    raise errors.DataError(
        f"image has {channels} channels; segjax takes RGB images (3), and "
        "converts greyscale (1) and RGBA (4). Convert the others first.")

  if label.shape.rank == 3 and label.shape[-1] in (1, None):
    label = tf.squeeze(label, axis=-1)
  if label.shape.rank != 2:
    raise errors.DataError(
        f"label must be [H, W] class ids (or [H, W, 1]), got {label.shape}.")
  if not label.dtype.is_integer:
    raise errors.DataError(
        f"label must hold integer class ids, got {label.dtype.name}; "
        "decode masks as uint8 or int32, not float.")
  if (image.shape[:2].is_fully_defined() and label.shape.is_fully_defined()
      and image.shape[:2] != label.shape):
    raise errors.DataError(
        f"image {image.shape[:2]} and label {label.shape} differ in size; "
        "every label map must match its image pixel for pixel.")
  check = tf.debugging.assert_equal(
      tf.shape(image)[:2], tf.shape(label),
      message="image and label differ in height or width")
  with tf.control_dependencies([check]):
    label = tf.cast(label, tf.int32)
  return {**ex, "image": image, "label": label}


def resize(ex: Example, size: Size) -> Example:
  """Resizes to exactly `size` (h, w): bilinear image, nearest label."""
  h, w = _pair(size, "size")
  return _resize_to(ex, tf.constant([h, w], tf.int32))


def random_scale(ex: Example, seed, scale_range=(0.5, 2.0),
                 base_size: Size | None = None) -> Example:
  """Rescales by a factor drawn uniformly from `scale_range`.

  Args:
    ex: example; the image comes back float32 (bilinear), the label int32
      (nearest).
    seed: int tensor [2].
    scale_range: (low, high) factor range.
    base_size: optional (long_side, short_side), e.g. (2048, 512) as in
      mmsegmentation: the factor then multiplies the one that fits the image
      into that box keeping its aspect ratio, so images of any size end up
      around the same scale. None scales relative to the input size.
  """
  low, high = _range(scale_range, "scale_range")
  if low <= 0:
    raise errors.ConfigError(f"scale_range={scale_range} must be positive.")
  factor = tf.random.stateless_uniform([], seed, low, high)
  hw = tf.cast(tf.shape(ex["image"])[:2], tf.float32)
  if base_size is not None:
    long_side, short_side = (float(s) for s in _pair(base_size, "base_size"))
    factor *= tf.minimum(long_side / tf.reduce_max(hw),
                         short_side / tf.reduce_min(hw))
  new_hw = tf.maximum(tf.cast(tf.round(hw * factor), tf.int32), 1)
  return _resize_to(ex, new_hw)


def random_crop(ex: Example, seed, size: Size) -> Example:
  """Crops a random window of `size` (h, w), or less where the input is smaller.

  Use `pad_to_size` afterwards for a fixed output shape (train_transform
  does). The offset is uniform over all windows that fit.
  """
  crop_h, crop_w = _pair(size, "size")
  hw = tf.shape(ex["image"])[:2]
  crop_hw = tf.minimum(hw, [crop_h, crop_w])
  slack = hw - crop_hw
  u = tf.random.stateless_uniform([2], seed)
  offset = tf.cast(tf.floor(u * tf.cast(slack + 1, tf.float32)), tf.int32)
  offset = tf.minimum(offset, slack)  # Guards u * n rounding up to n.
  image = tf.slice(ex["image"], tf.concat([offset, [0]], 0),
                   tf.concat([crop_hw, [-1]], 0))
  label = tf.slice(ex["label"], offset, crop_hw)
  return {**ex, "image": image, "label": label}


def pad_to_size(ex: Example, size: Size, image_fill=0,
                label_fill: int = IGNORE_INDEX) -> Example:
  """Pads at the bottom and right to at least `size` (h, w); never crops.

  Labels are padded with `label_fill` (ignore) so padding never counts as a
  class; `image_fill` is in the image's current units (0 after `normalize`
  is the mean colour).
  """
  h, w = _pair(size, "size")
  hw = tf.shape(ex["image"])[:2]
  pad = tf.maximum([h, w] - hw, 0)
  image, label = ex["image"], ex["label"]
  image = tf.pad(image, [[0, pad[0]], [0, pad[1]], [0, 0]],
                 constant_values=tf.cast(image_fill, image.dtype))
  label = tf.pad(label, [[0, pad[0]], [0, pad[1]]],
                 constant_values=tf.cast(label_fill, label.dtype))
  return {**ex, "image": image, "label": label}


def random_flip(ex: Example, seed, prob: float = 0.5) -> Example:
  """Mirrors image and label left-right with probability `prob`."""
  flip = tf.random.stateless_uniform([], seed) < prob
  image = tf.cond(flip, lambda: tf.reverse(ex["image"], [1]),
                  lambda: ex["image"])
  label = tf.cond(flip, lambda: tf.reverse(ex["label"], [1]),
                  lambda: ex["label"])
  return {**ex, "image": image, "label": label}


def photometric_distortion(ex: Example, seed, brightness_delta: float = 32.0,
                           contrast_range=(0.5, 1.5),
                           saturation_range=(0.5, 1.5),
                           hue_delta: float = 18.0) -> Example:
  """mmsegmentation's PhotoMetricDistortion; changes the image only.

  Brightness (add U(-delta, delta)), contrast (multiply), saturation
  (multiply S in HSV) and hue (shift H by U(-hue_delta, hue_delta) in
  OpenCV's 0..180 hue units) each happen with probability 0.5; contrast goes
  first or last with equal chance. Pixels are clipped to 0..255 after each
  step, so the image must be on the 0..255 scale (before `normalize`).

  Returns:
    The example with a float32 image [H, W, 3] in 0..255.
  """
  seed_apply, seed_value, seed_order = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  apply = tf.random.stateless_uniform([4], seed_apply) < 0.5
  u = tf.random.stateless_uniform([4], seed_value)  # One value per distortion.
  contrast_first = tf.random.stateless_uniform([], seed_order) < 0.5
  image = tf.cast(ex["image"], tf.float32)

  def when(flag, fn, x):
    return tf.cond(flag, lambda: fn(x), lambda: x)

  def contrast(x):
    low, high = contrast_range
    return tf.clip_by_value(x * (low + u[1] * (high - low)), 0.0, 255.0)

  def saturation(x):
    low, high = saturation_range
    alpha = low + u[2] * (high - low)
    return _map_hsv(x, lambda h, s: (h, tf.clip_by_value(s * alpha, 0.0, 1.0)))

  def hue(x):
    shift = (2.0 * u[3] - 1.0) * hue_delta / 180.0  # OpenCV: 180 per turn.
    return _map_hsv(x, lambda h, s: (tf.math.floormod(h + shift, 1.0), s))

  image = when(apply[0], lambda x: tf.clip_by_value(
      x + (2.0 * u[0] - 1.0) * brightness_delta, 0.0, 255.0), image)
  image = when(apply[1] & contrast_first, contrast, image)
  image = when(apply[2], saturation, image)
  image = when(apply[3], hue, image)
  image = when(apply[1] & ~contrast_first, contrast, image)
  return {**ex, "image": tf.clip_by_value(image, 0.0, 255.0)}


def normalize(ex: Example, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Example:
  """image -> float32 (image - mean) / std per channel; label -> int32.

  `mean` and `std` are on the image's scale: the defaults are ImageNet's in
  0..255 pixel units, as torchvision-pretrained backbones expect.
  """
  mean = _channels(mean, "mean")
  std = _channels(std, "std")
  if min(std) <= 0:
    raise errors.ConfigError(f"normalize: std={std} must be positive.")
  image = (tf.cast(ex["image"], tf.float32) - mean) / std
  return {**ex, "image": image, "label": tf.cast(ex["label"], tf.int32)}


def train_transform(ex: Example, seed, crop_size: Size,
                    scale_range=(0.5, 2.0), *, base_size: Size | None = None,
                    flip: bool = True, photometric: bool = True,
                    mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    label_fill: int = IGNORE_INDEX) -> Example:
  """The mmsegmentation training recipe, as one deterministic function.

  validate -> random_scale -> random_crop -> random_flip ->
  photometric_distortion -> normalize -> pad_to_size(crop_size), where the
  image is padded with 0 (the mean colour) and the label with `label_fill`.

  Args:
    ex: {"image": [H, W, C], "label": [H, W] or [H, W, 1], ...}.
    seed: int tensor [2]; e.g. tf.stack([global_seed, example_index]).
    crop_size: int or (h, w) output size.
    scale_range: factor range for random_scale; None skips scaling.
    base_size: see random_scale.
    flip, photometric: switch those steps off.
    mean, std: per-channel normalisation, 0..255 scale.
    label_fill: label of padded pixels.

  Returns:
    {"image": float32 [h, w, 3], "label": int32 [h, w], ...}, static shapes.
  """
  crop_h, crop_w = _pair(crop_size, "crop_size")
  seeds = tf.random.experimental.stateless_split(seed, 4)
  ex = validate(ex)
  if scale_range is not None:
    ex = random_scale(ex, seeds[0], scale_range, base_size)
  ex = random_crop(ex, seeds[1], (crop_h, crop_w))
  if flip:
    ex = random_flip(ex, seeds[2])
  if photometric:
    ex = photometric_distortion(ex, seeds[3])
  ex = normalize(ex, mean, std)
  ex = pad_to_size(ex, (crop_h, crop_w), 0.0, label_fill)
  return _with_shape(ex, crop_h, crop_w)


def eval_transform(ex: Example, *, size: Size | None = None,
                   base_size: Size | None = None, pad_size: Size | None = None,
                   mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   label_fill: int = IGNORE_INDEX) -> Example:
  """Deterministic evaluation transform: validate, optional resize, normalize.

  Args:
    ex: {"image": [H, W, C], "label": [H, W] or [H, W, 1], ...}.
    size: optional exact (h, w) to resize to (label nearest). Note that this
      scores the resized label map, not the original one.
    base_size: optional (long_side, short_side): resize keeping the aspect
      ratio to fit that box, as random_scale does with factor 1.
    pad_size: optional (h, w) to pad to (image 0, label `label_fill`) so
      images of different sizes batch together; padding is ignored by the
      metrics because its label is ignore. Give it >= every image's size.
    mean, std: per-channel normalisation, 0..255 scale.

  Returns:
    {"image": float32 [h, w, 3], "label": int32 [h, w], ...}.
  """
  if size is not None and base_size is not None:
    raise errors.ConfigError(
        "eval_transform: give size or base_size, not both.")
  ex = validate(ex)
  if size is not None:
    ex = resize(ex, size)
  elif base_size is not None:
    ex = random_scale(ex, tf.constant([0, 0]), (1.0, 1.0), base_size)
  ex = normalize(ex, mean, std)
  if pad_size is not None:
    pad_h, pad_w = _pair(pad_size, "pad_size")
    ex = pad_to_size(ex, (pad_h, pad_w), 0.0, label_fill)
    # An image larger than pad_size fails here rather than being cut.
    ex = _with_shape(ex, pad_h, pad_w)
  elif size is not None:
    ex = _with_shape(ex, *_pair(size, "size"))
  return ex


def _map_hsv(image: tf.Tensor, fn) -> tf.Tensor:
  """Applies fn(hue, saturation) -> (hue, saturation) to a 0..255 RGB image."""
  h, s, v = tf.unstack(tf.image.rgb_to_hsv(image / 255.0), axis=-1)
  h, s = fn(h, s)
  return tf.image.hsv_to_rgb(tf.stack([h, s, v], -1)) * 255.0


def _resize_to(ex: Example, hw: tf.Tensor) -> Example:
  image = tf.image.resize(ex["image"], hw, method="bilinear")
  # Nearest keeps labels in the set of values the input had (255 included).
  label = tf.image.resize(ex["label"][..., None], hw, method="nearest")[..., 0]
  return {**ex, "image": image, "label": label}


def _with_shape(ex: Example, h: int, w: int) -> Example:
  return {**ex, "image": tf.ensure_shape(ex["image"], [h, w, 3]),
          "label": tf.ensure_shape(ex["label"], [h, w])}


def _pair(size, name: str) -> tuple[int, int]:
  try:
    pair = (size, size) if not isinstance(size, Sequence) else tuple(size)
    pair = tuple(operator.index(s) for s in pair)
  except TypeError:
    pair = ()
  if len(pair) != 2 or min(pair) <= 0:
    raise errors.ConfigError(
        f"{name}={size!r} must be a positive int or an (h, w) pair of them.")
  return pair


def _range(value, name: str) -> tuple[float, float]:
  low, high = (float(v) for v in value)
  if low > high:
    raise errors.ConfigError(f"{name}={value!r}: low must not exceed high.")
  return low, high


def _channels(value, name: str) -> tuple[float, float, float]:
  value = tuple(float(v) for v in value)
  if len(value) != 3:
    raise errors.ConfigError(
        f"{name} must have one value per RGB channel, got {value}.")
  return value
