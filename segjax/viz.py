"""Colour maps, coloured masks, overlays and PNG files for segmentation.

Everything here is numpy on the host: pass `np.asarray(x)` of a jax.Array or
a tf.Tensor's `.numpy()`. Masks are class ids [H, W] with `ignore_index`
(255 by default) for "not labelled"; ignored pixels are drawn white by
`colorize` and left as the plain image by `overlay`, so they never pass for
class 0 (black in the VOC palette). Detections (boxes, classes, scores and
per-instance masks) are drawn by `draw_instances`; `instance_map` flattens
their masks into one id map.
"""
import os

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

from segjax import errors

IGNORE_INDEX = 255
IGNORE_COLOR = (255, 255, 255)


def palette(num_classes: int = 256) -> np.ndarray:
  """PASCAL VOC colour map: uint8 [num_classes, 3].

  Class c's colour spreads the bits of c over the three channels, most
  significant first: bit 3k of c sets bit 7-k of red, bit 3k+1 of green and
  bit 3k+2 of blue. So 0 is black, 1 (128, 0, 0), 2 (0, 128, 0),
  3 (128, 128, 0), ..., and neighbouring ids get far-apart colours.
  """
  if num_classes < 1:
    raise errors.ConfigError(
        f"palette(num_classes={num_classes}): need at least one class.")
  ids = np.arange(num_classes)
  colours = np.zeros((num_classes, 3), np.int64)
  for shift in range(8):  # 8 bit planes: ids up to 2**24 stay distinct.
    for channel in range(3):
      bit = (ids >> (3 * shift + channel)) & 1
      colours[:, channel] |= bit << (7 - shift)
  return colours.astype(np.uint8)


def colorize(mask, colours=None, *, ignore_index: int = IGNORE_INDEX,
             ignore_color=IGNORE_COLOR) -> np.ndarray:
  """Paints class ids with a palette.

  Args:
    mask: int [H, W] (or [H, W, 1]) class ids in [0, K) or `ignore_index`.
    colours: uint8 [K, 3] palette; default `palette(256)`.
    ignore_index: id drawn in `ignore_color` (white by default), not looked up.
    ignore_color: RGB of ignored pixels.

  Returns:
    uint8 [H, W, 3].

  Raises:
    DataError: if an id is negative or >= K and not `ignore_index`.
  """
  mask = _as_mask(mask)
  colours = palette(256) if colours is None else _as_palette(colours)
  ignored = mask == ignore_index
  ids = np.where(ignored, 0, mask)
  bad = (ids < 0) | (ids >= len(colours))
  if bad.any():
    raise errors.DataError(
        f"colorize: mask has ids {np.unique(ids[bad])[:10].tolist()} outside "
        f"the palette's {len(colours)} classes. Pass palette(num_classes) with "
        f"enough classes, or mark unlabelled pixels with {ignore_index}.")
  out = colours[ids]
  out[ignored] = np.asarray(ignore_color, np.uint8)
  return out


def overlay(image, mask, colours=None, alpha: float = 0.5, *,
            ignore_index: int = IGNORE_INDEX) -> np.ndarray:
  """Blends a coloured mask over an image.

  Args:
    image: uint8 [H, W, 3] (or [H, W] / [H, W, 1] grey) RGB image.
    mask: int [H, W] class ids, as for `colorize`.
    colours: uint8 [K, 3] palette; default `palette(256)`.
    alpha: weight of the mask colour, in [0, 1]; 0 gives back the image.
    ignore_index: pixels with this id keep the plain image.

  Returns:
    uint8 [H, W, 3]: (1 - alpha) * image + alpha * colour, rounded.
  """
  if not 0.0 <= alpha <= 1.0:
    raise errors.ConfigError(f"overlay: alpha={alpha} must be in [0, 1].")
  image = _as_rgb(image, "overlay")
  mask = _as_mask(mask)
  if mask.shape != image.shape[:2]:
    raise errors.DataError(
        f"overlay: mask {list(mask.shape)} and image {list(image.shape[:2])} "
        "differ in size; resize the mask (nearest) to the image first.")
  colour = colorize(mask, colours, ignore_index=ignore_index).astype(np.float32)
  blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colour
  blended = np.where((mask == ignore_index)[..., None], image, blended)
  return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def save_png(path, array, colours=None) -> None:
  """Writes an image or mask as a PNG file, creating parent folders.

  Args:
    path: file path (str or os.PathLike).
    array: uint8 [H, W] (grey or mask ids), [H, W, 1], [H, W, 3] (RGB) or
      [H, W, 4] (RGBA); bool [H, W] is written as 0/255.
    colours: optional uint8 [K, 3] palette (K <= 256) for an [H, W] mask:
      the PNG is then written in palette mode, like VOC's masks, so it keeps
      the raw ids and still looks coloured in an image viewer.
  """
  array = np.asarray(array)
  if array.dtype == bool:
    array = array.astype(np.uint8) * 255
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.dtype != np.uint8 or not (
      array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
    raise errors.DataError(
        f"save_png: cannot write {array.dtype} {list(array.shape)}; expected "
        "uint8 [H, W], [H, W, 3] or [H, W, 4]. Colour a class mask with "
        "colorize() or convert with np.clip(x, 0, 255).astype(np.uint8).")
  image = Image.fromarray(array)
  if colours is not None:
    if array.ndim != 2:
      raise errors.DataError(
          "save_png: a palette applies to a [H, W] mask of class ids, got "
          f"{list(array.shape)}.")
    colours = _as_palette(colours)[:256]
    flat = np.zeros((256, 3), np.uint8)
    flat[:len(colours)] = colours
    # "P" mode stores the array itself as palette indices: ids stay raw.
    height, width = array.shape
    image = Image.frombytes("P", (width, height),
                            np.ascontiguousarray(array).tobytes())
    image.putpalette(flat.ravel().tolist())
  parent = os.path.dirname(os.fspath(path))
  if parent:
    os.makedirs(parent, exist_ok=True)
  image.save(path, format="PNG")


def instance_map(masks, scores, score_thresh: float = 0.5, *,
                 classes=None) -> np.ndarray:
  """Flattens per-detection masks into one instance-id map.

  Args:
    masks: [D, H, W] bool (integers: nonzero is in; floats: >= 0.5 is in).
    scores: [D] float detection scores.
    score_thresh: detections with a lower score (or a NaN one) are left out.
    classes: optional [D] int class ids; detections of class 0 (padding) are
      left out too.

  Returns:
    int32 [H, W]: 0 where no kept detection covers the pixel, else i + 1 for
    detection i. Where kept masks overlap the higher score wins (the lower
    index on a tie). Write it with `save_png(path, ids.astype(np.uint8),
    palette(256))` when D < 256: id i + 1 then has the colour that
    `draw_instances` gives detection i by default.
  """
  masks, scores, keep = _instances(masks, scores, classes, score_thresh,
                                   "instance_map")
  ids = np.zeros(masks.shape[1:], np.int32)
  for i in _draw_order(scores, keep):
    ids[masks[i]] = i + 1
  return ids


def draw_instances(image, boxes, classes, scores, masks, class_names=None, *,
                   score_thresh: float = 0.5, alpha: float = 0.5,
                   colours=None) -> np.ndarray:
  """Draws detections (masks, boxes and labels; boxes and labels alone
  without masks) over an image.

  Each detection with score >= `score_thresh` and class > 0 gets its mask
  blended in a colour of its own (per instance, not per class, so touching
  objects of one class are told apart), its box outlined in that colour
  (1 px, 2 px on images at least 128 px on the short side; boxes are clipped
  to the image, and ones wholly outside or not finite get no outline) and a
  label "name 0.93" on a patch of that colour at the box's top-left: just
  above the box where there is room, else just inside it, shifted so it
  stays in the image. Detections are drawn lowest score first, so the best
  ones end on top; masks are blended once per pixel, in the colour of the
  highest-scoring detection there (see `instance_map`).

  Args:
    image: uint8 [H, W, 3] (or [H, W] / [H, W, 1] grey) RGB image.
    boxes: [D, 4] float (x1, y1, x2, y2), pixels; pixel column c spans
      [c, c + 1), so (0, 0, W, H) is the whole image.
    classes: [D] int class ids in 1..K; 0 is padding / no detection.
    scores: [D] float scores.
    masks: [D, H, W] bool, at the image's size (integers: nonzero is in;
      floats: >= 0.5 is in); None for a detector without masks (Faster
      R-CNN): nothing is blended.
    class_names: sequence indexed by class id (index 0 = background), or
      None; labels then show the id. Ids past its end also show the id.
    score_thresh: detections scoring lower are not drawn.
    alpha: weight of the instance colour in masks, in [0, 1].
    colours: uint8 [M, 3] instance colours, detection i getting
      colours[i % M]; default `palette(256)[1:]`, i.e. the colour of id i + 1
      in the VOC palette, like `instance_map`'s ids written with
      `save_png(..., palette(256))`.

  Returns:
    uint8 [H, W, 3], a new array; with nothing to draw, a copy of the image.

  Raises:
    DataError: on malformed inputs (shapes that disagree, masks of another
      size than the image).
    ConfigError: if alpha is outside [0, 1].
  """
  if not 0.0 <= alpha <= 1.0:
    raise errors.ConfigError(
        f"draw_instances: alpha={alpha} must be in [0, 1].")
  image = _as_rgb(image, "draw_instances")
  if np.size(scores) == 0:
    return image.copy()
  if masks is None:
    scores, keep = _kept(scores, classes, score_thresh, "draw_instances")
  else:
    masks, scores, keep = _instances(masks, scores, classes, score_thresh,
                                     "draw_instances")
  num = len(scores)
  boxes = np.asarray(boxes, np.float64)
  if boxes.shape != (num, 4):
    raise errors.DataError(
        f"draw_instances: boxes must be [D, 4] (x1, y1, x2, y2) for the "
        f"{num} scores, got {list(boxes.shape)}.")
  classes = np.asarray(classes).reshape(-1).astype(np.int64)
  if masks is not None and masks.shape[1:] != image.shape[:2]:
    raise errors.DataError(
        f"draw_instances: masks {list(masks.shape)} and image "
        f"{list(image.shape[:2])} differ in size; paste / resize the masks "
        "to the image first.")
  if not keep.any():
    return image.copy()
  colours = (palette(256)[1:] if colours is None
             else _as_palette(colours))
  instance_colours = colours[np.arange(num) % len(colours)]

  out = Image.fromarray(image.copy())  # Drawing must not touch the caller's image.
  if masks is not None:
    ids = instance_map(masks, scores, score_thresh, classes=classes)
    covered = ids > 0
    blended = image.astype(np.float32)
    colour = instance_colours[ids[covered] - 1].astype(np.float32)
    blended[covered] = (1.0 - alpha) * blended[covered] + alpha * colour
    out = Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))

  height, width = image.shape[:2]
  line = 2 if min(height, width) >= 128 else 1
  draw = ImageDraw.Draw(out)
  font = ImageFont.load_default()
  for i in _draw_order(scores, keep):
    rect = _pixel_box(boxes[i], width, height)
    if rect is None:
      continue
    fill = tuple(int(v) for v in instance_colours[i])
    draw.rectangle(rect, outline=fill, width=line)
    c = int(classes[i])
    name = (str(class_names[c]) if class_names is not None
            and c < len(class_names) else str(c))
    _label(draw, font, f"{name} {scores[i]:.2f}", rect, fill, width, height)
  return np.asarray(out, np.uint8).copy()


def _instances(masks, scores, classes, score_thresh, where):
  """Checks masks [D, H, W] and scores [D]; returns (masks, scores, keep)."""
  scores = np.asarray(scores, np.float64).reshape(-1)
  masks = np.asarray(masks)
  if masks.ndim != 3 or len(masks) != len(scores):
    raise errors.DataError(
        f"{where}: masks must be [D, H, W] for the {len(scores)} scores, got "
        f"{list(masks.shape)}.")
  if np.issubdtype(masks.dtype, np.floating):
    masks = masks >= 0.5
  else:
    masks = masks.astype(bool)
  return (masks,) + _kept(scores, classes, score_thresh, where)


def _kept(scores, classes, score_thresh, where):
  """Checks scores [D] and classes [D] (or None); returns (scores, keep)."""
  scores = np.asarray(scores, np.float64).reshape(-1)
  keep = scores >= score_thresh  # False for NaN.
  if classes is not None:
    classes = np.asarray(classes).reshape(-1)
    if len(classes) != len(scores):
      raise errors.DataError(
          f"{where}: {len(classes)} classes for {len(scores)} scores; both "
          "are [D].")
    keep &= classes > 0
  return scores, keep


def _draw_order(scores, keep):
  """Kept indices, lowest score first; on a tie the lower index comes last."""
  index = np.arange(len(scores))
  order = np.lexsort((-index, scores))
  return [int(i) for i in order if keep[i]]


def _pixel_box(box, width, height):
  """(x1, y1, x2, y2) pixels -> inclusive [left, top, right, bottom] in the
  image, or None if the box is not finite or misses the image."""
  if not np.isfinite(box).all():
    return None
  x1, y1, x2, y2 = box
  left, top = max(np.floor(min(x1, x2)), 0), max(np.floor(min(y1, y2)), 0)
  right = min(np.ceil(max(x1, x2)), width) - 1
  bottom = min(np.ceil(max(y1, y2)), height) - 1
  if right < left or bottom < top:
    return None
  return [int(left), int(top), int(right), int(bottom)]


def _label(draw, font, text, rect, fill, width, height):
  """Writes `text` on a `fill` patch at the top-left of inclusive `rect`."""
  pad = 1
  x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
  label_w, label_h = x1 - x0 + 2 * pad, y1 - y0 + 2 * pad
  left, top = rect[0], rect[1]
  y = top - label_h if top - label_h >= 0 else top
  x = max(min(left, width - label_w), 0)
  y = max(min(y, height - label_h), 0)
  draw.rectangle([x, y, x + label_w - 1, y + label_h - 1], fill=fill)
  luma = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
  ink = (0, 0, 0) if luma > 128 else (255, 255, 255)
  draw.text((x + pad - x0, y + pad - y0), text, fill=ink, font=font)


def _as_rgb(image, where) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise errors.DataError(
        f"{where}: image must be uint8 [H, W, 3], got {image.dtype} "
        f"{list(image.shape)}. Convert float images with "
        "np.clip(x, 0, 255).astype(np.uint8) (undo normalisation first).")
  return image


def _as_mask(mask) -> np.ndarray:
  mask = np.asarray(mask)
  if mask.ndim == 3 and mask.shape[-1] == 1:
    mask = mask[..., 0]
  if mask.ndim != 2 or not (np.issubdtype(mask.dtype, np.integer)
                            or mask.dtype == bool):
    raise errors.DataError(
        f"expected an integer class-id mask [H, W], got {mask.dtype} "
        f"{list(mask.shape)}. Take argmax over the class axis of logits first.")
  return mask.astype(np.int64)


def _as_palette(colours) -> np.ndarray:
  colours = np.asarray(colours)
  if colours.ndim != 2 or colours.shape[-1] != 3 or len(colours) == 0:
    raise errors.DataError(
        f"a palette must be [K, 3] RGB, got {list(colours.shape)}; "
        "use viz.palette(num_classes).")
  return colours.astype(np.uint8)
