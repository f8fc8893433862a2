"""Inference the way papers report numbers: whole image or sliding window,
optionally multi-scale with horizontal flips, answered at the image's size.

  segmenter = Segmenter(model, InferenceOptions.from_config(config.eval))
  labels, probs = segmenter(variables, image)   # image float32 [H, W, 3]

Modes (config `eval.mode`):
  whole  the model sees the whole image; with `eval.resize_to` (h, w) it sees
         the image resized to that size, and its output is resized back.
  slide  crop_size windows every `stride` pixels (mmsegmentation's
         slide_inference: the last window of a row or column is shifted to
         end at the border); the logits of overlapping windows are averaged.
         Along a side shorter than the crop the window is that side, as
         mmsegmentation runs the model on the smaller patch unpadded.
  Both run at every scale of `eval.scales` (the image resized by that
  factor, PyTorch bilinear) and, with `eval.flip`, on its mirror image too;
  the softmax probabilities of all runs are resized back to the image and
  averaged.

Compilation. Images of many sizes share compiled programs: an image is
placed in the top-left corner of a canvas whose sides are rounded up to a
multiple of `eval.bucket` pixels, and the image's true size travels as a
traced value. Resizing, window placement and flipping act on that valid
region only (segjax.ops.region_resize), so one program serves every image
whose canvas is the same, whatever its size. Each distinct canvas compiles
once (`Segmenter.compilations` counts them). What padding changes: with
`resize_to` or in slide mode, nothing as long as the image is at least a
crop large (the model only sees image pixels; along a side shorter than a
crop the window spans the canvas, up to bucket - 1 pixels of padding); in
whole mode at the native size, the model also sees the zero (mean-colour)
padding right and below the image, which CNNs feel near those borders; set
`eval.bucket=1` for exact native-size inference at one compilation per
image size.
"""
import dataclasses
import math
import os
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

from segjax import metrics
from segjax.config import option
from segjax.errors import ConfigError, DataError
from segjax.ops import region_resize

MODES = ("whole", "slide")


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
  """How to run a model on one image (see the module docstring).

  mode: "whole" or "slide".
  resize_to: whole mode: (h, w) the model runs at, or None (native size).
  crop_size, stride: slide mode: window (h, w) and step (h, w).
  scales: image scale factors; (1.0,) is single-scale.
  flip: also run on the horizontally mirrored image.
  bucket: canvas sides are rounded up to a multiple of this.
  """
  mode: str = "whole"
  resize_to: Optional[Tuple[int, int]] = None
  crop_size: Optional[Tuple[int, int]] = None
  stride: Optional[Tuple[int, int]] = None
  scales: Tuple[float, ...] = (1.0,)
  flip: bool = False
  bucket: int = 32

  def __post_init__(self):
    if self.mode not in MODES:
      raise ConfigError(f"eval.mode is {self.mode!r}; use 'whole' or 'slide'")
    if self.mode == "slide" and not (self.crop_size and self.stride):
      raise ConfigError("eval.mode 'slide' needs eval.crop_size and eval.stride, "
                        "e.g. --config.eval.crop_size=512,512 --config.eval.stride=341,341")
    if not self.scales or min(self.scales) <= 0:
      raise ConfigError(f"eval.scales must be positive factors, got {self.scales}")
    if self.bucket < 1:
      raise ConfigError(f"eval.bucket must be >= 1, got {self.bucket}")

  @classmethod
  def from_config(cls, eval_config) -> "InferenceOptions":
    """From a config's `eval` block; missing keys take the defaults."""
    def pair(key):
      value = eval_config.get(key)
      return tuple(int(v) for v in value) if value else None
    get = lambda key: option(eval_config, "eval", key)  # config.DEFAULTS
    return cls(mode=get("mode"), resize_to=pair("resize_to"),
               crop_size=pair("crop_size"), stride=pair("stride"),
               scales=tuple(float(s) for s in get("scales")),
               flip=bool(get("flip")), bucket=int(get("bucket")))


class Segmenter:
  """Compiled inference of one model under one set of InferenceOptions."""

  def __init__(self, model, options: InferenceOptions):
    self.model = model
    self.options = options
    self.compilations = 0  # distinct canvases traced so far
    self._run = jax.jit(self._canvas_probabilities)
    self._confusion = jax.jit(self.canvas_confusion, static_argnums=(4, 5))

  def canvas_shape(self, height: int, width: int) -> Tuple[int, int]:
    """The static canvas an image of this size is placed on."""
    b = self.options.bucket
    return math.ceil(height / b) * b, math.ceil(width / b) * b

  def place(self, image, fill=0):
    """image [H, W, ...] -> ([1, *canvas, ...] with the image top-left and
    `fill` elsewhere, its size int32 [2])."""
    height, width = image.shape[:2]
    canvas = np.full((1, *self.canvas_shape(height, width), *image.shape[2:]), fill,
                     image.dtype)
    canvas[0, :height, :width] = image
    return canvas, np.array([height, width], np.int32)

  def __call__(self, variables, image) -> Tuple[np.ndarray, np.ndarray]:
    """Labels int32 [H, W] and probabilities float32 [H, W, K] of one
    normalised image float32 [H, W, 3]."""
    height, width = image.shape[:2]
    probs = self._run(variables, *self.place(np.asarray(image, np.float32)))
    probs = probs[0, :height, :width]
    return np.asarray(jnp.argmax(probs, axis=-1), np.int32), np.asarray(probs)

  def confusion(self, variables, image, label, num_classes: int,
                ignore_index: int = 255) -> np.ndarray:
    """Confusion matrix int32 [K, K] (rows ground truth) of one normalised
    image float32 [H, W, 3] against its label int [H, W], at its resolution."""
    canvas, valid = self.place(np.asarray(image, np.float32))
    labels, _ = self.place(np.asarray(label, np.int32), fill=ignore_index)
    return np.asarray(self._confusion(variables, canvas, valid, labels, num_classes,
                                      ignore_index))

  # --- traced --------------------------------------------------------------
  def canvas_confusion(self, variables, canvas, valid, labels, num_classes,
                       ignore_index=255):
    """[K, K] int32 confusion of the image in canvas [1, Hc, Wc, 3] (size
    valid int32 [2]) against labels [1, Hc, Wc] (ignore outside the image)."""
    probs = self._canvas_probabilities(variables, canvas, valid)
    return metrics.confusion_matrix(labels, jnp.argmax(probs, axis=-1), num_classes,
                                    ignore_index=ignore_index)

  def _canvas_probabilities(self, variables, canvas, valid):
    """canvas [1, Hc, Wc, 3] with the image in [:valid[0], :valid[1]] ->
    averaged probabilities [1, Hc, Wc, K], zero outside the image."""
    self.compilations += 1  # runs once per trace, i.e. per compiled canvas
    shape = canvas.shape[1:3]
    total, runs = 0.0, 0
    for scale in self.options.scales:
      if scale == 1.0:
        scaled, scaled_valid = canvas, valid
      else:
        scaled_shape = tuple(math.ceil(s * scale) for s in shape)
        scaled_valid = jnp.maximum(jnp.floor(valid * scale + 0.5), 1).astype(jnp.int32)
        scaled = region_resize.resize_region(canvas, scaled_shape, valid, scaled_valid)
      x = scaled
      if self.options.flip:  # The mirror image rides in the same batch.
        x = jnp.concatenate([scaled, region_resize.flip_region(scaled, scaled_valid[1])])
      probs = jax.nn.softmax(self._logits(variables, x, scaled_valid), axis=-1)
      if self.options.flip:
        probs = probs[:1] + region_resize.flip_region(probs[1:], scaled_valid[1])
      if scale != 1.0:
        probs = region_resize.resize_region(probs, shape, scaled_valid, valid)
      total, runs = total + probs, runs + x.shape[0]
    inside = ((jnp.arange(shape[0]) < valid[0])[:, None]
              & (jnp.arange(shape[1]) < valid[1])[None, :])
    return jnp.where(inside[None, :, :, None], total / runs, 0.0)

  def _apply(self, variables, images):
    return self.model.apply(variables, images, train=False)["logits"].astype(jnp.float32)

  def _logits(self, variables, canvas, valid):
    """Logits [B, Hc, Wc, K] of the images in canvas[:, :valid[0], :valid[1]]
    (B is 1, or 2 with the mirror image)."""
    if self.options.mode == "slide":
      return self._slide(variables, canvas, valid)
    if self.options.resize_to is None:
      return self._apply(variables, canvas)
    size = self.options.resize_to
    x = region_resize.resize_region(canvas, size, valid, jnp.array(size))
    logits = self._apply(variables, x)
    return region_resize.resize_region(logits, canvas.shape[1:3], jnp.array(size), valid)

  def _slide(self, variables, canvas, valid):
    """mmsegmentation's slide_inference on the valid region, every window in
    one batch. Windows a smaller image does not need are computed and given
    weight 0 (the canvas fixes how many there can be)."""
    (ch, cw), (sh, sw) = self.options.crop_size, self.options.stride
    batch, height, width, channels = canvas.shape
    # Where the canvas is smaller than a crop, the window is the canvas side:
    # mmsegmentation runs the model on the smaller patch, unpadded. (With
    # eval.bucket > 1 the canvas may still hold up to bucket - 1 pixels of
    # padding there, which the model then sees.)
    wh, ww = min(ch, height), min(cw, width)
    rows = max(-(-(height - wh) // sh), 0) + 1
    cols = max(-(-(width - ww) // sw), 0) + 1
    need_rows = jnp.maximum(valid[0] - ch + sh - 1, 0) // sh + 1
    need_cols = jnp.maximum(valid[1] - cw + sw - 1, 0) // sw + 1
    corners, crops = [], []
    for i in range(rows):
      for j in range(cols):
        # The last window of a row or column ends at the image's border.
        y = jnp.maximum(jnp.minimum(i * sh, valid[0] - wh), 0)
        x = jnp.maximum(jnp.minimum(j * sw, valid[1] - ww), 0)
        weight = ((i < need_rows) & (j < need_cols)).astype(jnp.float32)
        corners.append((y, x, weight))
        crops.append(jax.lax.dynamic_slice(canvas, (0, y, x, 0),
                                           (batch, wh, ww, channels)))
    logits = self._apply(variables, jnp.concatenate(crops))
    logits = logits.reshape(len(crops), batch, *logits.shape[1:])
    total = jnp.zeros((batch, height, width, logits.shape[-1]), jnp.float32)
    count = jnp.zeros((batch, height, width, 1), jnp.float32)
    for (y, x, weight), window in zip(corners, logits):
      at = (0, y, x, 0)
      total = jax.lax.dynamic_update_slice(
          total, jax.lax.dynamic_slice(total, at, (batch, wh, ww, total.shape[3]))
          + weight * window, at)
      count = jax.lax.dynamic_update_slice(
          count, jax.lax.dynamic_slice(count, at, (batch, wh, ww, 1)) + weight, at)
    return total / jnp.maximum(count, 1.0)


# --- image files -------------------------------------------------------------


def read_image(path):
  """Reads an image file as uint8 [H, W, 3].

  Grayscale is replicated to three channels and an alpha channel is dropped;
  anything unreadable raises DataError naming the file.
  """
  if not os.path.isfile(path):
    raise DataError(f"image {path!r} does not exist; check the path")
  try:
    with Image.open(path) as img:
      img.load()
      rgb = img.convert("RGB")
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise DataError(f"image {path!r} cannot be decoded ({e}); is it a valid "
                    "PNG/JPEG file? Re-export it or leave it out") from e
  return np.asarray(rgb, np.uint8)
