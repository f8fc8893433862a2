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

Masks leave as M x M crops around their boxes with the boxes they span
(segjax.data.mask_crops, which says why and how well), not image-sized.

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
from segjax.data.mask_crops import MASK_CROP_SIZE, crop_masks
from segjax.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from segjax.errors import ConfigError, DataError

Example = dict[str, tf.Tensor]


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
