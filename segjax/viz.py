"""Colour maps, coloured masks, overlays and PNG files for segmentation.

Everything here is numpy on the host: pass `np.asarray(x)` of a jax.Array or
a tf.Tensor's `.numpy()`. Masks are class ids [H, W] with `ignore_index`
(255 by default) for "not labelled"; ignored pixels are drawn white by
`colorize` and left as the plain image by `overlay`, so they never pass for
class 0 (black in the VOC palette).
"""
import os

import numpy as np
from PIL import Image

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
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise errors.DataError(
        f"overlay: image must be uint8 [H, W, 3], got {image.dtype} "
        f"{list(image.shape)}. Convert float images with "
        "np.clip(x, 0, 255).astype(np.uint8) (undo normalisation first).")
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
