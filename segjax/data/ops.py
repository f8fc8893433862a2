"""tf.data ops over example dicts that know how to treat each key.

The semantic recipe (segjax.data.transforms) and the instance recipe
(segjax.data.instances) are both compositions of these, so a label map, an
instance mask and a box always move with their image in the same way.
(segjax.ops, by contrast, holds jax.numpy operators for the models.)

Keys and how each op treats them; any other key passes through untouched:

  image       [H, W, C]  bilinear (half-pixel centres, no antialiasing),
                         float32 after resizing; padded with 0 by default
  label       [H, W]     int class ids; nearest, so no class is invented;
                         padded with 255 (ignore)
  weight      [H, W]     float per-pixel loss weights; nearest; padded with
                         0, so padding weighs nothing
  masks       [N, H, W]  instance masks; nearest, so they stay binary;
                         padded with 0
  boxes       [N, 4]     float32 (x1, y1, x2, y2) pixels; scaled with the
                         image, mirrored, shifted by crops, always clipped
                         to the image; rows where "valid" [N] is False keep
                         their (zero) boxes on flips
  mask_boxes  [N, 4]     the boxes "mask_crops" were cut from: moved as
                         "boxes" but never clipped, as a crop spans its
                         whole box wherever the image ends
  mask_crops  [N, M, M]  instance masks in their mask_boxes' frame: not
                         resized, cropped or padded (scaling the image
                         scales the box only), mirrored left-right by flips
  image_size  [2]        int32 (h, w) of the real image in the tensor;
                         set to the new size by resize and crop, kept by pad

Every op reads the current height and width from "image", which must be
present. The ops are deterministic; a random op takes a `seed`, an int
tensor [2] as for `tf.random.stateless_uniform`, and draws its parameter
once for all keys.
"""
import dataclasses

import tensorflow as tf

from segjax.data import normalization

Example = dict[str, tf.Tensor]
IGNORE_INDEX = 255


@dataclasses.dataclass(frozen=True)
class PixelKey:
  """How a per-pixel key is laid out, resized and padded."""
  method: str  # tf.image.resize method
  rows: int  # axis of the height; the width follows it
  fill: float  # default padding value


PIXEL_KEYS = {
    "image": PixelKey("bilinear", 0, 0),
    "label": PixelKey("nearest", 0, IGNORE_INDEX),
    "weight": PixelKey("nearest", 0, 0),
    "masks": PixelKey("nearest", 1, 0),
}


# Box keys -> whether an op clips them to the image.
BOX_KEYS = {"boxes": True, "mask_boxes": False}


def _pixel_keys(ex: Example):
  return [(k, PIXEL_KEYS[k]) for k in ex if k in PIXEL_KEYS]


def _box_keys(ex: Example):
  return [(k, BOX_KEYS[k]) for k in ex if k in BOX_KEYS]


def size_of(ex: Example) -> tf.Tensor:
  """int32 [2]: the (h, w) of ex["image"]."""
  return tf.shape(ex["image"])[:2]


def resize(ex: Example, hw: tf.Tensor) -> Example:
  """Resizes every pixel key to `hw` (int32 [2]) and scales the boxes.

  Returns:
    ex with "image" float32 [h, w, C], the other maps in their own dtype
    at [..., h, w], boxes scaled by (w / W, h / H) and clipped to (w, h),
    and "image_size" = hw where present.
  """
  old = size_of(ex)
  out = dict(ex)
  for key, spec in _pixel_keys(ex):
    value = ex[key]
    if key == "image":
      value = tf.cast(value, tf.float32)  # What bilinear returns anyway.
    if value.shape.rank == spec.rows + 2:  # [H, W] or [N, H, W]: 1 channel
      out[key] = tf.image.resize(value[..., None], hw, method=spec.method)[..., 0]
    else:  # [H, W, C]
      out[key] = tf.image.resize(value, hw, method=spec.method)
  ratio = tf.cast(hw, tf.float32) / tf.cast(old, tf.float32)
  for key, clip in _box_keys(ex):
    boxes = ex[key] * tf.stack([ratio[1], ratio[0], ratio[1], ratio[0]])
    # Clipped: x * (w / W) for x = W may land an ulp beyond w.
    out[key] = _clip_boxes(boxes, hw) if clip else boxes
  if "image_size" in ex:
    out["image_size"] = tf.cast(hw, tf.int32)
  return out


def crop(ex: Example, offset: tf.Tensor, hw: tf.Tensor) -> Example:
  """The window of size `hw` at `offset` (int32 [2], (y, x)) of every map.

  Boxes move by -offset and are clipped to the window (a box outside it
  gets zero area); "image_size" becomes the part of the real image that
  lies in the window.
  """
  out = dict(ex)
  for key, spec in _pixel_keys(ex):
    value = ex[key]
    trail = value.shape.rank - spec.rows - 2  # channels
    begin = tf.concat([tf.zeros([spec.rows], tf.int32), offset,
                       tf.zeros([trail], tf.int32)], 0)
    size = tf.concat([tf.fill([spec.rows], -1), hw, tf.fill([trail], -1)], 0)
    out[key] = tf.slice(value, begin, size)
  shift = tf.cast(tf.stack([offset[1], offset[0], offset[1], offset[0]]), tf.float32)
  for key, clip in _box_keys(ex):
    out[key] = _clip_boxes(ex[key] - shift, hw) if clip else ex[key] - shift
  if "image_size" in ex:
    out["image_size"] = tf.clip_by_value(ex["image_size"] - offset, 0, hw)
  return out


def pad(ex: Example, hw, fill: dict | None = None) -> Example:
  """Pads every map at the bottom and right to at least `hw`; never crops.

  Args:
    hw: (h, w) ints or int32 [2].
    fill: per-key padding values in each key's current units (0 for an
      image after `normalize` is the mean colour); PIXEL_KEYS' defaults
      for the keys not named.
  """
  fill = fill or {}
  extra = tf.maximum(tf.cast(hw, tf.int32) - size_of(ex), 0)
  out = dict(ex)
  for key, spec in _pixel_keys(ex):
    value = ex[key]
    paddings = [[0, 0]] * value.shape.rank
    paddings[spec.rows] = [0, extra[0]]
    paddings[spec.rows + 1] = [0, extra[1]]
    value_fill = fill.get(key, spec.fill)
    out[key] = tf.pad(value, paddings, constant_values=tf.cast(value_fill, value.dtype))
  return out


def flip_left_right(ex: Example) -> Example:
  """Mirrors every map; boxes become (W - x2, y1, W - x1, y2).

  Rows marked invalid (where "valid" is present) keep their boxes. Mask
  crops mirror about their box's centre, which is where the box goes.
  """
  out = dict(ex)
  for key, spec in _pixel_keys(ex):
    out[key] = tf.reverse(ex[key], [spec.rows + 1])
  if "mask_crops" in ex:
    out["mask_crops"] = tf.reverse(ex["mask_crops"], [2])
  width = tf.cast(size_of(ex)[1], tf.float32)
  for key, _ in _box_keys(ex):
    x1, y1, x2, y2 = tf.unstack(ex[key], axis=-1)
    boxes = tf.stack([width - x2, y1, width - x1, y2], axis=-1)
    if "valid" in ex:
      boxes = tf.where(ex["valid"][:, None], boxes, ex[key])
    out[key] = boxes
  return out


def random_flip(ex: Example, seed, prob: float = 0.5) -> Example:
  """`flip_left_right` with probability `prob`, drawn from `seed`."""
  flip = tf.random.stateless_uniform([], seed) < prob
  return tf.cond(flip, lambda: flip_left_right(ex), lambda: ex)


def normalize(ex: Example, mean=normalization.IMAGENET_MEAN,
              std=normalization.IMAGENET_STD) -> Example:
  """image -> float32 (image - mean) / std per channel; label -> int32.

  `mean` and `std` are on the image's scale: the defaults are ImageNet's in
  0..255 pixel units, as torchvision-pretrained backbones expect. The numpy
  twin for image files is segjax.data.normalization.normalize.

  Raises:
    ConfigError: unless mean and std have 3 values each and std > 0.
  """
  mean, std = normalization.check_stats(mean, std)
  out = {**ex, "image": (tf.cast(ex["image"], tf.float32) - mean) / std}
  if "label" in ex:
    out["label"] = tf.cast(ex["label"], tf.int32)
  return out


def with_size(ex: Example, h: int, w: int) -> Example:
  """Asserts (and sets statically) that every map is h x w."""
  out = dict(ex)
  for key, spec in _pixel_keys(ex):
    shape = ex[key].shape.as_list()
    shape[spec.rows:spec.rows + 2] = [h, w]
    out[key] = tf.ensure_shape(ex[key], shape)
  return out


def _clip_boxes(boxes: tf.Tensor, hw: tf.Tensor) -> tf.Tensor:
  size = tf.cast(tf.stack([hw[1], hw[0], hw[1], hw[0]]), tf.float32)
  return tf.clip_by_value(boxes, 0.0, size)
