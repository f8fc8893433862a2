"""Instance segmentation input for Mask R-CNN: tfds -> fixed-shape batches.

torchvision and detectron2 hand the model lists of per-image targets of any
length and batch images padded to the largest one. A jit-compiled step wants
one shape for every batch, so here each example becomes

  image:       float32 [Hc, Wc, 3], normalised, padded bottom/right with 0
               (the mean colour) to the example's canvas (Hc, Wc), see
               "Canvases" below
  image_size:  int32 [2] (h, w) of the resized image on the canvas; boxes
               lie inside it (clip predictions to it)
  boxes:       float32 [G, 4] (x1, y1, x2, y2) in canvas pixels
  classes:     int32 [G] in 1..K (dataset label + 1); 0 = padding, as
               background is 0 in torchvision
  mask_crops:  uint8 [G, M, M], each instance's mask over its crop box
               resized to M x M (M = MASK_CROP_SIZE = 112), soft: 0..255
               for 0..1; all 0 in padding rows (see Masks below)
  mask_boxes:  float32 [G, 4] (x1, y1, x2, y2) canvas pixels, the box each
               crop spans: the instance's box grown by 1 stored pixel a
               side (so partly off the image at its edges); 0 in padding
  valid:       bool [G], True for real rows
  crowd:       bool [G], True for kept crowd regions (see drop_crowd)
  num_dropped: int32 [], instances that did not fit in G

G = `max_instances`. The first G instances in dataset order are kept
(segjax_shapes: back to front; COCO: json order); the rest are counted in
num_dropped and lost, so pick G above the dataset's maximum (COCO 2017
train has at most 93 non-crowd instances per image) or accept the loss.
Crowd regions are left out of training targets, as torchvision's and
detectron2's COCO loaders do; evaluation keeps them, flagged in `crowd`, for
COCO-style matching. Boxes are clipped to the image and zero-area boxes
dropped, as torchvision's ConvertCocoPolysToMask does.

Masks: a training step needs each sampled roi's 28 x 28 (C4: 14 x 14)
target, ROI-aligned from its instance's mask (torchvision's
project_masks_on_boxes). Image-sized masks would cost G * Hc * Wc bytes an
image (100 * 1344^2 = 180 MB at the COCO defaults, 2.9 GB a batch of 16),
made here and copied to the device every step for a few thousand target
pixels. So, as TF Model Garden's Mask R-CNN does, each mask leaves as an
M x M crop around its box (`crop_masks`: from the mask as stored, before
resizing; bilinear, 2 x 2 samples a crop pixel; 0..255), with the box it
spans, and the model aligns the targets from the crop through that box
(targets.compact_mask_targets): G * M^2 bytes an image, 1.25 MB; with the
boxes 20.1 MB a batch of 16 instead of 2.89 GB, 144 times less. Scaling
the image scales the crop box only; flipping mirrors the crop with it.
The crop box is the instance's box grown by CROP_MARGIN = 1 pixel a side,
so that it holds all of the mask as torchvision's roi_align reads it
(bilinear, so up to half a pixel past the mask's edge).

M = 112 = 4 x 28: a positive roi (IoU >= 0.5 with its box, so 1/2 to 2
times the box a side) spans 2 to 8 crop pixels a target bin, and the crop
resolves what the targets' adaptive sampling sees. Mean |difference| to
torchvision's targets from the image-sized masks (28 x 28 targets of rois
jittered about the boxes at IoU >= 0.5, 12 segjax_shapes scenes a row):

  M                                     28      56      112     224
  objects 20-60 px (128^2 scenes)      .0176   .0067   .0037   .0031
  the same, images scaled by 1.6       .0219   .0130   .0113   .0110
  objects 80-240 px (512^2 scenes)     .0199   .0064   .0018   .0007

Small objects are at the floor by 112; large ones still gain at 224, for
4 times the bytes. The floor of the scaled row is torchvision's: its masks
are resized with nearest neighbour, the crops come from the stored mask.
Against targets from the stored mask itself, torchvision's differ there by
.0099 and the crops' by .0053 (objects of 64^2 scenes scaled by 1.5: .026
and .0052). C4's 14 x 14 targets differ by .0093 and .0012 (rows 2, 3).
What else was measured at M = 112: 2 x 2 samples a crop pixel rather than
1 take the largest difference on large objects from .27 to .13 (the mean
stays); without the margin, row 1 is .0043 (largest difference .52
instead of .26); reading the crop at pixel centres instead of at
torchvision's half-pixel offset (compact_mask_targets) would make row 1
.030.

Evaluation batches carry the crops too; neither form reaches the device
there (tasks.instance.EVAL_KEYS), and COCO AP compares with the masks as
stored (segjax.data.ground_truth, `select_instances(mask_size=None)`).

Canvases. One canvas: every image on (Hc, Wc), `canvas` or a square of
max_size that fits either orientation; a landscape 800 x 1333 image then
fills 59 % of a 1344 x 1344 canvas. With group_by_aspect (the COCO recipe),
images are grouped by orientation, as torchvision's GroupedBatchSampler
and detectron2's AspectRatioGroupedDataset group them: landscape images
(h <= w, squares included) sit on the landscape canvas

  (Hc, Wc) = (round_up(min(max(min_size), max_size)), round_up(max_size))

(800 x 1344 for 800 / 1333; `canvas` if given, height <= width) and portrait
ones (h > w) on its transpose. A resized image's short side is at most
max(min_size) and its long side at most max_size, so it always fits its
group's canvas. Every batch, in training and in evaluation, holds one
orientation (segjax.data.groups: the group of each training step is dealt
from a deck with the split's proportions, so the stream stays a pure
function of (seed, step)), and the compiled steps compile once per canvas:
two train steps and two evaluation steps (one each where a split holds one
orientation only). The stored size decides the orientation (resizing keeps
it); each of the data.num_shards training shards must hold both
orientations if the split does (a DataError says to lower num_shards).

Config keys, `config.instances.*` (missing ones take `default_config()`):
  max_instances      100      G, rows of boxes / classes / masks
  min_size           (800,)   short side after resizing; training draws one
                              of the tuple per example (multi-scale),
                              evaluation uses the last, as torchvision does
  max_size           1333     long side at most this
  canvas             ()       (Hc, Wc), multiples of size_divisibility;
                              () = a square of max_size rounded up to it,
                              or with group_by_aspect the landscape canvas
                              of "Canvases" (given: height <= width)
  group_by_aspect    False    a canvas per orientation, each batch of one
                              (True in configs/mask_rcnn_r50_fpn_coco.py)
  size_divisibility  32       what the canvas must be a multiple of
  flip               True     random horizontal flip (p = 0.5) in training
  drop_crowd         True     leave crowd regions out of training targets
Also read, as segjax.data.pipeline reads them: seed, dataset, data_dir,
train.batch_size, eval.batch_size, eval.split, augment.mean / std (0..255
scale), data.num_shards / shuffle_buffer / cache_below / prefetch /
skip_bad_examples, and num_classes (optional; K + 1, background included,
as the Mask R-CNN heads count it) to check the classes against.

Resizing follows GeneralizedRCNNTransform: scale = min(min_size / short,
max_size / long), and, beyond torchvision, also at most canvas / size so the
image always fits the canvas. Sizes round to the nearest pixel (detectron2's
ResizeShortestEdge) where torchvision floors, so the short side is exactly
min_size rather than sometimes one less. Boxes and mask boxes scale by new
/ old size per axis; images resize bilinearly (half-pixel centres, no
antialiasing); crops stay as they are (the key-generic ops of
segjax.data.ops do all of this; image-sized masks, for `mask_size=None`,
resize with nearest neighbour as both libraries do).

Streams: `train_batches` and `eval_batches` read segjax.data.streams, as
the semantic ones do (see its docstring): the training stream is a pure
function of (seed, step), resumes at any step without reading earlier
examples, and does not depend on the number of hosts; evaluation pads
every host to the same number of batches, marks real examples in "mask" [B]
and carries each one's "image_id" (-1 for padding) and "orig_size" so
predictions map back to the original image for COCO evaluation.
"""
import dataclasses
from typing import Optional

import ml_collections
import numpy as np
import tensorflow as tf

from segjax.data import groups, ops, streams
from segjax.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from segjax.errors import ConfigError, DataError

Example = dict[str, tf.Tensor]
# The ground-truth mask crops: side M, samples per crop pixel and axis,
# pixels added to each side of the box; "Masks" in the module docstring
# says why.
MASK_CROP_SIZE = 112
CROP_SUPERSAMPLE = 2
CROP_MARGIN = 1.0


def default_config() -> ml_collections.ConfigDict:
  """The `config.instances` defaults: Mask R-CNN's COCO recipe."""
  return ml_collections.ConfigDict(dict(
      max_instances=100, min_size=(800,), max_size=1333, canvas=(),
      size_divisibility=32, flip=True, drop_crowd=True, group_by_aspect=False))


def orientation(sizes: np.ndarray) -> np.ndarray:
  """int [n]: 0 for landscape or square (h <= w), 1 for portrait, of int
  [n, 2] (h, w) sizes; resizing keeps it, so the stored size decides."""
  sizes = np.asarray(sizes).reshape(-1, 2)
  return (sizes[:, 0] > sizes[:, 1]).astype(np.int64)


# The groups of group_by_aspect, in the order of Settings.canvases.
ORIENTATIONS = groups.Grouping(orientation, ("landscape", "portrait"))


@dataclasses.dataclass(frozen=True)
class Settings:
  """Validated `config.instances`; see the module docstring.

  `canvas` is the one the transforms pad to; `canvases` holds one per group
  of `grouping`: (canvas,) and None, or (landscape, portrait) and
  ORIENTATIONS (`for_group` gives a group's Settings).
  """
  max_instances: int
  min_size: tuple[int, ...]
  max_size: int
  canvas: tuple[int, int]
  flip: bool
  drop_crowd: bool
  canvases: tuple[tuple[int, int], ...] = ()
  grouping: Optional[groups.Grouping] = None

  def for_group(self, group: int) -> "Settings":
    return dataclasses.replace(self, canvas=self.canvases[group])

  def for_size(self, hw) -> "Settings":
    """The Settings of an image of stored size hw = (h, w)."""
    return self.for_group(int(orientation(hw)[0]) if self.grouping else 0)


def settings(config) -> Settings:
  """Reads and checks `config.instances` (defaults for missing keys).

  Raises:
    ConfigError: for an unknown key, a non-positive size, an empty
      min_size, or a canvas that is not a multiple of size_divisibility.
  """
  c = dict(default_config())
  given = dict(config.get("instances") or {})
  unknown = sorted(set(given) - set(c))
  if unknown:  # A misspelt key would otherwise leave its default in force.
    raise ConfigError(f"unknown config.instances keys {unknown}; the keys "
                      f"are {', '.join(sorted(c))}")
  c.update(given)
  min_size = c["min_size"]
  min_size = (min_size,) if isinstance(min_size, int) else tuple(min_size)
  max_size, divisor, g = c["max_size"], c["size_divisibility"], c["max_instances"]
  if not min_size or min(min_size) < 1 or min(max_size, divisor, g) < 1:
    raise ConfigError(
        f"config.instances: min_size={c['min_size']}, max_size={max_size}, "
        f"size_divisibility={divisor} and max_instances={g} must be positive "
        "(min_size an int or a non-empty tuple of ints)")

  def round_up(x):
    return -(-x // divisor) * divisor

  grouped = bool(c["group_by_aspect"])
  canvas = tuple(c["canvas"] or ())
  if not canvas and grouped:  # A resized landscape image's short and long side.
    canvas = (round_up(min(max(min_size), max_size)), round_up(max_size))
  elif not canvas:  # Fits any orientation: the long side is at most max_size.
    canvas = (round_up(max_size),) * 2
  if len(canvas) != 2 or min(canvas) < 1 or any(x % divisor for x in canvas):
    raise ConfigError(
        f"config.instances.canvas={canvas} must be (height, width), both "
        f"positive multiples of size_divisibility={divisor}, or () for a "
        "square of max_size rounded up to one")
  canvas = (int(canvas[0]), int(canvas[1]))
  if grouped and canvas[0] > canvas[1]:
    raise ConfigError(
        f"config.instances.canvas={canvas} is the landscape canvas of "
        "group_by_aspect (portrait images take its transpose): give height "
        "<= width, or () for the one min_size and max_size need")
  return Settings(int(g), tuple(int(x) for x in min_size), int(max_size),
                  canvas, bool(c["flip"]), bool(c["drop_crowd"]),
                  canvases=(canvas, canvas[::-1]) if grouped else (canvas,),
                  grouping=ORIENTATIONS if grouped else None)


def select_instances(example: Example, max_instances: int, drop_crowd: bool = True,
                     mask_size: int | None = MASK_CROP_SIZE) -> Example:
  """tfds features -> the first <= G usable instances, not yet padded.

  Args:
    example: a segjax_shapes or coco_instances example: "image" uint8
      [H, W, 3], "objects" with "mask" [K, H, W, 1], "bbox" [K, 4] (x1, y1,
      x2, y2) pixels, "label" [K] 0-based, optional "is_crowd" [K];
      "image_id" passes through.
    max_instances: G.
    drop_crowd: leave out crowd instances (else keep them, flagged).
    mask_size: M of the masks' box crops (`crop_masks`); None keeps the
      image-sized masks (evaluation's ground truth).

  Returns:
    {"image": uint8 [H, W, 3], "boxes": float32 [N, 4] clipped to the image,
    "classes": int32 [N] (label + 1), "mask_crops": uint8 [N, M, M] and
    "mask_boxes": float32 [N, 4] (or "masks": uint8 [N, H, W]), "crowd":
    bool [N], "num_dropped": int32 []}, N <= G; boxes of zero area are left
    out.
  """
  image = example["image"]
  objects = example["objects"]
  hw = tf.shape(image)[:2]
  k = tf.shape(objects["bbox"])[0]
  masks = objects["mask"]
  # An image without objects decodes its masks as [0, 0, 0, 1]; give them
  # the image's size. Otherwise a mask of another size is a data error.
  check = tf.debugging.Assert(
      tf.logical_or(k == 0, tf.reduce_all(tf.shape(masks)[1:3] == hw)),
      ["instance masks differ in size from their image", tf.shape(masks), hw])
  with tf.control_dependencies([check]):
    masks = tf.reshape(tf.cast(masks, tf.uint8), tf.concat([[k], hw], 0))
  size = tf.cast(tf.stack([hw[1], hw[0], hw[1], hw[0]]), tf.float32)
  boxes = tf.clip_by_value(tf.cast(objects["bbox"], tf.float32), 0.0, size)
  crowd = tf.cast(objects.get("is_crowd", tf.zeros([k], tf.bool)), tf.bool)
  keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  if drop_crowd:
    keep &= ~crowd
  index = tf.where(keep)[:, 0]
  num_dropped = tf.maximum(tf.size(index) - max_instances, 0)
  index = index[:max_instances]
  out = {
      "image": image,
      "boxes": tf.gather(boxes, index),
      "classes": tf.gather(tf.cast(objects["label"], tf.int32), index) + 1,
      "masks": tf.gather(masks, index),
      "crowd": tf.gather(crowd, index),
      "num_dropped": tf.cast(num_dropped, tf.int32),
  }
  if "image_id" in example:
    out["image_id"] = tf.cast(example["image_id"], tf.int64)
  return out if mask_size is None else crop_masks(out, mask_size)


def crop_masks(ex: Example, size: int = MASK_CROP_SIZE,
               supersample: int = CROP_SUPERSAMPLE, margin: float = CROP_MARGIN
               ) -> Example:
  """Replaces the image-sized "masks" by M x M crops around their boxes.

  The mask is read as torchvision's roi_align reads it, bilinear between
  pixel values, but with pixel (r, c)'s value at its centre (c + 1/2,
  r + 1/2) and constant from the border pixels' centres to half a pixel
  past the image (where torchvision reads pixel k at x = k, and clamps to
  the border over [-1, 0] and [W - 1, W]). Each crop pixel averages
  supersample^2 samples of it: crop pixel j covers [x1 + j s, x1 + (j + 1)
  s), s = (x2 - x1) / M, of the crop box (x1, y1, x2, y2), the instance's
  box grown by `margin` pixels a side so that the half-pixel ramp around
  the mask's edge, and any extension past the image, are inside the crop.
  The crop is thus box-relative: scaling the image scales its box only,
  flipping the image mirrors the crop about its box's centre.

  Args:
    ex: "masks" uint8 [N, H, W] and "boxes" float32 [N, 4] (x1, y1, x2, y2)
      with positive area inside the image (`select_instances`' rows).
    size: M, the crop's side.
    supersample: samples per crop pixel and axis (antialiasing where a
      box is larger than M pixels).
    margin: pixels added to each side of a box.

  Returns:
    ex without "masks", with "mask_crops" uint8 [N, M, M] (0..255 for
    0..1) and "mask_boxes" float32 [N, 4], the crop boxes.
  """
  masks = ex["masks"]
  boxes = tf.cast(ex["boxes"], tf.float32) + tf.constant([-1.0, -1.0, 1.0, 1.0]) * margin
  n = tf.shape(masks)[0]
  samples = size * supersample
  # One border pixel more on each side (tf.pad's SYMMETRIC mode does the
  # same 10x slower): samples up to half a pixel past the image then read
  # the border pixel, past that the zeros crop_and_resize puts outside.
  padded = masks[..., None]
  padded = tf.concat([padded[:, :1], padded, padded[:, -1:]], 1)
  padded = tf.concat([padded[:, :, :1], padded, padded[:, :, -1:]], 2)
  x1, y1, x2, y2 = tf.unstack(boxes, axis=-1)
  step_x, step_y = (x2 - x1) / samples, (y2 - y1) / samples
  # Samples from x1 + step / 2 to x2 - step / 2. Position c + 1/2 (pixel
  # c's centre) is index c + 1 of the padded mask, and crop_and_resize
  # reads index a * (L - 1) at the normalised coordinate a, L = W + 2.
  first = tf.stack([y1 + step_y / 2, x1 + step_x / 2], -1) + 0.5
  last = tf.stack([y2 - step_y / 2, x2 - step_x / 2], -1) + 0.5
  length = tf.cast(tf.shape(masks)[1:3], tf.float32) + 1.0
  norm = tf.concat([first / length, last / length], -1)
  dense = tf.image.crop_and_resize(padded, norm, tf.range(n), [samples, samples])
  if supersample > 1:
    dense = tf.nn.avg_pool2d(dense, supersample, supersample, "VALID")
  out = {k: v for k, v in ex.items() if k != "masks"}
  out["mask_crops"] = tf.ensure_shape(
      tf.cast(tf.round(dense[..., 0] * 255.0), tf.uint8), [None, size, size])
  out["mask_boxes"] = boxes
  return out


def pad_instances(ex: Example, max_instances: int) -> Example:
  """Pads the N <= G instance rows to G and adds "valid" [G] bool.

  Padding rows have box 0, class 0, an all-zero mask or crop (its box 0)
  and crowd False.
  """
  n = tf.shape(ex["boxes"])[0]
  pad = max_instances - n
  out = dict(ex)
  for key in ("boxes", "classes", "masks", "mask_crops", "mask_boxes", "crowd"):
    if key not in ex:  # masks, or crops and their boxes
      continue
    value = ex[key]
    rows = [[0, pad]] + [[0, 0]] * (value.shape.rank - 1)
    out[key] = tf.ensure_shape(tf.pad(value, rows),
                               [max_instances] + value.shape[1:].as_list())
  out["valid"] = tf.range(max_instances) < n
  return out


def instance_example(example: Example, max_instances: int, drop_crowd: bool = True,
                     mask_size: int | None = MASK_CROP_SIZE) -> Example:
  """tfds features -> G fixed rows at the image's own size (no transform).

  `select_instances` then `pad_instances`: "image" uint8 [H, W, 3], "boxes"
  float32 [G, 4], "classes" int32 [G], "mask_crops" uint8 [G, M, M] and
  "mask_boxes" float32 [G, 4] (mask_size None: "masks" uint8 [G, H, W]),
  "valid" bool [G], "crowd" bool [G], "num_dropped" int32 [].
  """
  return pad_instances(select_instances(example, max_instances, drop_crowd, mask_size),
                       max_instances)


def resized_size(hw: tf.Tensor, min_size, max_size: int,
                 canvas: tuple[int, int]) -> tf.Tensor:
  """int32 [2]: (h, w) scaled by min(min_size / short, max_size / long,
  canvas / (h, w)), rounded half up; `min_size` may be a scalar tensor."""
  hw = tf.cast(hw, tf.float64)  # float64: no 799.9999 -> 799 surprises.
  scale = tf.minimum(tf.cast(min_size, tf.float64) / tf.reduce_min(hw),
                     tf.cast(max_size, tf.float64) / tf.reduce_max(hw))
  scale = tf.minimum(scale, tf.reduce_min(tf.constant(canvas, tf.float64) / hw))
  return tf.maximum(tf.cast(tf.floor(hw * scale + 0.5), tf.int32), 1)


def resize(ex: Example, min_size, max_size: int, canvas: tuple[int, int]) -> Example:
  """Resizes the image (bilinear) and scales boxes and mask boxes with it.

  Args:
    ex: "image" [H, W, 3], "boxes" [N, 4], "mask_crops" [N, M, M] and
      "mask_boxes" [N, 4] or "masks" [N, H, W].
    min_size: int or scalar int tensor (the drawn scale).

  Returns:
    ex with image float32 [h, w, 3], boxes scaled by (w / W, h / H) and
    clipped to (w, h), mask boxes scaled alike (crops unchanged: they are
    box-relative) or masks resized to uint8 [N, h, w] (nearest).
  """
  return ops.resize(ex, resized_size(ops.size_of(ex), min_size, max_size, canvas))


def hflip(ex: Example) -> Example:
  """Mirrors image and masks (or crops) left-right; boxes and mask boxes
  become (W - x2, y1, W - x1, y2).

  Rows marked invalid (if "valid" is present) keep their zero boxes.
  """
  return ops.flip_left_right(ex)


def pad_to_canvas(ex: Example, canvas: tuple[int, int]) -> Example:
  """Pads image (0) and any masks (0) bottom/right to `canvas` (crops stay
  as they are); adds "image_size"."""
  ex = ops.pad({**ex, "image_size": ops.size_of(ex)}, canvas)
  return ops.with_size(ex, *canvas)


def train_transform(ex: Example, seed, s: Settings,
                    mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Example:
  """Random scale from s.min_size, flip, normalise, pad to canvas and to G.

  Args:
    ex: `select_instances` output (or `instance_example`'s).
    seed: int tensor [2]; every random draw of the example derives from it.

  Returns:
    The fixed-shape example of the module docstring.
  """
  scale_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  choice = tf.random.stateless_uniform([], scale_seed, 0, len(s.min_size), tf.int32)
  ex = resize(ex, tf.gather(s.min_size, choice), s.max_size, s.canvas)
  if s.flip:
    ex = ops.random_flip(ex, flip_seed)
  return _finish(ex, s, mean, std)


def eval_transform(ex: Example, s: Settings, mean=IMAGENET_MEAN,
                   std=IMAGENET_STD) -> Example:
  """Deterministic: resize with the last min_size, normalise, pad."""
  return _finish(resize(ex, s.min_size[-1], s.max_size, s.canvas), s, mean, std)


def _finish(ex, s, mean, std):
  """Normalises (0..255 mean / std), pads to the canvas and to G rows."""
  ex = pad_to_canvas(ops.normalize(ex, mean, std), s.canvas)
  return ex if "valid" in ex else pad_instances(ex, s.max_instances)


def train_batches(config, start_step=0, process_index=None, process_count=None,
                  split="train"):
  """Yields the host-local training batches of steps start_step, start_step+1, ...

  Sharding, shuffling, seeding and resuming as segjax.data.streams says;
  with group_by_aspect each step's batch holds one orientation, on its
  canvas.

  Yields:
    dict of numpy arrays, B/P examples of the module docstring's form:
    "image" float32 [b, Hc, Wc, 3], "image_size" int32 [b, 2], "boxes"
    float32 [b, G, 4], "classes" int32 [b, G], "mask_crops" uint8
    [b, G, M, M], "mask_boxes" float32 [b, G, 4], "valid" / "crowd" bool
    [b, G], "num_dropped" int32 [b], plus "image_id" int64 [b] where the
    dataset has it.
  """
  s = settings(config)
  mean, std = tuple(config.augment.mean), tuple(config.augment.std)
  augments = [lambda seed, ex, sg=s.for_group(g): train_transform(ex, seed, sg, mean, std)
              for g in range(len(s.canvases))]
  ds = streams.training_stream(
      config, lambda ex: select_instances(ex, s.max_instances, s.drop_crowd),
      augments if s.grouping else augments[0],
      start_step=start_step, process_index=process_index,
      process_count=process_count, split=split, grouping=s.grouping)
  yield from streams.checked(ds, config, _check_classes)


def eval_batches(config, process_index=None, process_count=None, split=None,
                 local_devices=1):
  """Yields the host-local evaluation batches, padded, with a "mask".

  The per-host batch is eval.batch_size / P rounded up to a multiple of
  `local_devices`; every host yields the same number of batches. Crowd
  instances are kept (flagged in "crowd"); nothing is flipped and the image
  is resized with the last of `min_size`. With group_by_aspect the
  landscape batches come first, then the portrait ones, each on its canvas
  (the same sequence of shapes on every host).

  Yields:
    the train_batches dict plus "mask" int32 [b] (1 = real example),
    "image_id" int64 [b] (-1 for padding) and "orig_size" int32 [b, 2], the
    (H, W) of the image as stored.
  """
  s = settings(config)
  mean, std = tuple(config.augment.mean), tuple(config.augment.std)

  def prepare(example, s):
    ex = select_instances(example, s.max_instances, drop_crowd=False)
    orig_size = tf.shape(ex["image"])[:2]
    out = eval_transform(ex, s, mean, std)
    out["orig_size"] = orig_size
    out["image_id"] = ex.get("image_id", tf.constant(-1, tf.int64))
    out["mask"] = tf.constant(1, tf.int32)
    return out

  def blank(ds):  # From the static shapes: a host may have no example.
    example = {k: tf.zeros(v.shape, v.dtype) for k, v in ds.element_spec.items()}
    example["image_id"] = tf.constant(-1, tf.int64)
    return example

  prepares = [lambda ex, sg=s.for_group(g): prepare(ex, sg)
              for g in range(len(s.canvases))]
  ds = streams.evaluation_stream(config, prepares if s.grouping else prepares[0],
                                 blank, split=split, process_index=process_index,
                                 process_count=process_count,
                                 local_devices=local_devices, grouping=s.grouping)
  yield from streams.checked(ds, config, _check_classes)


def _check_classes(batch, config):
  """DataError for instance classes at or above num_classes (if set)."""
  num_classes = config.get("num_classes")
  classes = batch["classes"][batch["valid"]]
  if num_classes and classes.size and classes.max() >= num_classes:
    values = np.unique(classes[classes >= num_classes])[:10].tolist()
    raise DataError(
        f"dataset {config.dataset} has instance classes {values} (label + 1) "
        f"but num_classes={num_classes}; for Mask R-CNN num_classes counts "
        "the background: set it to the number of object classes + 1")
