"""A detector's output for one image, mapped from the canvas it ran on to
the image as stored: boxes scaled, mask probabilities (of a detector with
masks) pasted and thresholded at 0.5 (torchvision's `transform.postprocess`
and `paste_masks_in_image`).
"""
import functools
import math
from typing import Dict, Sequence

import jax
import numpy as np

from segjax.models.detection import postprocess

# Original-size frames are rounded up to this many pixels per side before
# pasting, so that a dataset of many image sizes compiles a few paste shapes.
PASTE_BUCKET = 128


@functools.partial(jax.jit, static_argnums=(3,))
def _paste(mask_probs, boxes, valid, frame, image_size):
  return postprocess.paste_masks(mask_probs, boxes, frame, image_size, valid)


def to_original(detections: Dict[str, np.ndarray], image_size: Sequence[int],
                orig_size: Sequence[int]) -> Dict[str, np.ndarray]:
  """One image's detections in the canvas frame -> the stored image's frame.

  Args:
    detections: numpy "boxes" [D,4], "scores" [D], "classes" [D], "valid"
      [D] and, from a detector with masks, "mask_probs" [D,M,M] (the
      detector's `paste=False` output, one image).
    image_size: (h, w) of the resized image on the canvas.
    orig_size: (H, W) of the image as stored.

  Returns:
    "boxes" [n,4] float32 (x1, y1, x2, y2) in original pixels, "scores"
    [n], "classes" [n] int32 and, with "mask_probs", "masks" [n,H,W] bool,
    for the n valid detections, best first.
  """
  (h, w), (big_h, big_w) = (int(x) for x in image_size), (int(x) for x in orig_size)
  scale = np.array([big_w / w, big_h / h, big_w / w, big_h / h], np.float32)
  boxes = detections["boxes"].astype(np.float32) * scale
  keep = np.asarray(detections["valid"], bool)
  out = {"boxes": boxes[keep], "scores": detections["scores"][keep],
         "classes": detections["classes"][keep].astype(np.int32)}
  if "mask_probs" in detections:
    frame = tuple(math.ceil(x / PASTE_BUCKET) * PASTE_BUCKET for x in (big_h, big_w))
    masks = np.asarray(_paste(detections["mask_probs"], boxes, detections["valid"], frame,
                              np.array([big_h, big_w], np.int32)))
    out["masks"] = masks[keep, :big_h, :big_w]
  return out
