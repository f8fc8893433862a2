"""Mask R-CNN inference post-processing with static shapes.

torchvision's RoIHeads.postprocess_detections, maskrcnn_inference and
paste_masks_in_image (torchvision/models/detection/roi_heads.py), written
so one compiled function serves every batch:

  select_detections   one image: decode per-class boxes, clip, softmax,
                      drop background, score threshold, small-box removal,
                      per-class NMS, the best `detections_per_img` in
                      descending score order, in fixed slots with `valid`.
  postprocess_detections  the same over a batch (vmap).
  class_mask_probs    sigmoid of each detection's own class channel.
  paste_masks         28 x 28 probabilities pasted into the image frame at
                      their boxes, torchvision's way (1 px zero padding,
                      integer boxes, bilinear resize), optionally thresholded.

torchvision returns per-image lists of varying length; here every image
has `detections_per_img` slots and a `valid` mask, and padding slots hold
zeros. The functions are pure and jit-safe; wrap them (or the detector
that calls them) in `jax.jit`.
"""
from typing import Dict, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp

from segjax.errors import ConfigError
from segjax.ops.boxes import batched_nms, clip_boxes, decode_boxes

Array = jax.Array
# The box head's BoxCoder weights (torchvision's bbox_reg_weights default).
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def select_detections(class_logits: Array, box_deltas: Array, proposals: Array,
                      proposals_valid: Array, image_size: Union[Sequence[int], Array],
                      *, score_thresh: float = 0.05, nms_thresh: float = 0.5,
                      detections_per_img: int = 100, min_size: float = 1e-2,
                      weights: Sequence[float] = BOX_WEIGHTS) -> Dict[str, Array]:
  """Final detections of one image (RoIHeads.postprocess_detections).

  Every (proposal, object class) pair is a candidate box: the class's
  deltas decoded against the proposal and clipped to the image, scored by
  the class's softmax probability. Candidates scoring <= score_thresh, with
  a side < min_size, or from a padding proposal are dropped; NMS runs
  within each class; the best `detections_per_img` survivors of all classes
  are kept in descending score order (torchvision's `keep[:100]`).

  Args:
    class_logits: [P, K+1] float, class 0 = background.
    box_deltas: [P, K+1, 4] (or [P, 4(K+1)]) per-class (dx, dy, dw, dh).
    proposals: [P, 4] (x1, y1, x2, y2) pixels, the boxes the head saw.
    proposals_valid: [P] bool, False for padding slots (`select_proposals`).
    image_size: (height, width) before padding, ints or a traced [2] array.
    score_thresh: candidates need score > score_thresh (0.05).
    nms_thresh: per-class NMS IoU threshold (0.5).
    detections_per_img: static number of output slots D (100).
    min_size: torchvision's remove_small_boxes(min_size=1e-2).
    weights: BoxCoder weights (10, 10, 5, 5).

  Returns:
    {"boxes": [D, 4] float32, "scores": [D] float32 softmax probabilities,
    "classes": [D] int32 in 1..K, "valid": [D] bool}; padding slots hold
    zeros (class 0).
  """
  if int(detections_per_img) < 1:
    raise ConfigError(f"detections_per_img must be positive, got {detections_per_img}.")
  logits = jnp.asarray(class_logits, jnp.float32)
  p, c = logits.shape
  deltas = jnp.asarray(box_deltas, jnp.float32).reshape(p, c, 4)
  props = jnp.asarray(proposals, jnp.float32)
  boxes = clip_boxes(decode_boxes(deltas, props[:, None, :], weights), image_size)
  scores = jax.nn.softmax(logits, axis=-1)
  # Background dropped, then flattened proposal-major as torchvision's
  # boxes[:, 1:].reshape(-1, 4), so equal scores tie-break in its order.
  boxes = boxes[:, 1:].reshape(-1, 4)
  scores = scores[:, 1:].reshape(-1)
  classes = jnp.tile(jnp.arange(1, c, dtype=jnp.int32), p)
  keep = ((scores > score_thresh)
          & jnp.repeat(jnp.asarray(proposals_valid, bool), c - 1)
          & (boxes[:, 2] - boxes[:, 0] >= min_size)
          & (boxes[:, 3] - boxes[:, 1] >= min_size))
  # Dropped candidates rank -inf: batched_nms never picks nor lets them suppress.
  rank = jnp.where(keep, scores, -jnp.inf)
  idx, valid = batched_nms(boxes, rank, classes, nms_thresh, int(detections_per_img))
  return {"boxes": jnp.where(valid[:, None], boxes[idx], 0.0),
          "scores": jnp.where(valid, scores[idx], 0.0),
          "classes": jnp.where(valid, classes[idx], 0),
          "valid": valid}


def postprocess_detections(class_logits: Array, box_deltas: Array, proposals: Array,
                           proposals_valid: Array, image_size: Array,
                           **options) -> Dict[str, Array]:
  """`select_detections` over a batch.

  Args:
    class_logits: [N, P, K+1]; box_deltas: [N, P, K+1, 4];
    proposals: [N, P, 4]; proposals_valid: [N, P] bool.
    image_size: [N, 2] int (height, width) of each image before padding.
    **options: select_detections' keyword options (static).

  Returns:
    {"boxes": [N, D, 4], "scores": [N, D], "classes": [N, D] int32,
    "valid": [N, D] bool}.
  """
  fn = lambda *a: select_detections(*a, **options)  # noqa: E731
  return jax.vmap(fn)(class_logits, box_deltas, proposals, proposals_valid,
                      jnp.asarray(image_size))


def class_mask_probs(mask_logits: Array, classes: Array) -> Array:
  """Sigmoid of each ROI's own class channel (torchvision's maskrcnn_inference).

  Args:
    mask_logits: [..., M, M, K+1] channels-last logits.
    classes: [...] int, the class of each ROI.

  Returns:
    [..., M, M] float32 probabilities.
  """
  cls = jnp.asarray(classes, jnp.int32)[..., None, None, None]
  picked = jnp.take_along_axis(mask_logits.astype(jnp.float32), cls, axis=-1)
  return jax.nn.sigmoid(picked[..., 0])


def paste_boxes(boxes: Array, mask_size: int, padding: int = 1) -> Array:
  """Integer pixel boxes the masks are pasted at (expand_masks + expand_boxes).

  torchvision pads each M x M mask with `padding` zeros on every side and
  grows its box about the centre by (M + 2 padding) / M to match, then
  truncates the coordinates to integers (`.to(torch.int64)`, toward zero).
  The pasted mask then covers columns x1..x2 and rows y1..y2 inclusive.

  Args:
    boxes: [..., 4] float (x1, y1, x2, y2) pixels.
    mask_size: M (28).
    padding: torchvision's 1.

  Returns:
    [..., 4] int32.
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  scale = jnp.float32((mask_size + 2 * padding) / mask_size)
  w_half = (boxes[..., 2] - boxes[..., 0]) * 0.5 * scale
  h_half = (boxes[..., 3] - boxes[..., 1]) * 0.5 * scale
  x_c = (boxes[..., 2] + boxes[..., 0]) * 0.5
  y_c = (boxes[..., 3] + boxes[..., 1]) * 0.5
  out = jnp.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], -1)
  return out.astype(jnp.int32)        # float -> int conversion truncates toward zero


def _paste_axis(lo: Array, hi: Array, in_size: int, out_size: int, limit: Array):
  """Bilinear source taps of every image row (or column) for integer boxes.

  torchvision resizes the padded mask to n = max(hi - lo + 1, 1) pixels with
  F.interpolate(bilinear, align_corners=False) and writes it at lo..hi.
  Pixel t of the image reads resized pixel u = t - lo, whose source index
  and weights follow ATen's CPU kernel (area_pixel_compute_source_index,
  guard_index_and_lambda), in float32.

  Args:
    lo, hi: [...] int32 box start and end (inclusive).
    in_size: padded mask side, M + 2 padding.
    out_size: image rows (or columns) of the output frame.
    limit: [...] or scalar int, the true image extent; pixels at or past
      it stay zero (torchvision pastes into the unpadded image).

  Returns:
    i0, i1: [..., out_size] int32 source indices; w0, w1: float32 weights,
    zero outside the box or the image.
  """
  n = jnp.maximum(hi - lo + 1, 1).astype(jnp.float32)[..., None]
  t = jnp.arange(out_size, dtype=jnp.int32)
  u = t - lo[..., None]
  inside = (u >= 0) & (t <= hi[..., None]) & (t < jnp.asarray(limit)[..., None])
  scale = jnp.float32(in_size) / n
  src = jnp.maximum(scale * (u.astype(jnp.float32) + 0.5) - 0.5, 0.0)
  i0 = jnp.clip(jnp.floor(src), 0, in_size - 1).astype(jnp.int32)
  lam = jnp.clip(src - i0.astype(jnp.float32), 0.0, 1.0)
  i1 = jnp.minimum(i0 + 1, in_size - 1)
  w0 = jnp.where(inside, 1.0 - lam, 0.0)
  w1 = jnp.where(inside, lam, 0.0)
  return i0, i1, w0, w1


def paste_masks(mask_probs: Array, boxes: Array, image_shape: Tuple[int, int],
                image_size: Optional[Array] = None, valid: Optional[Array] = None,
                *, padding: int = 1, threshold: Optional[float] = 0.5) -> Array:
  """Pastes per-box masks into the image frame (paste_masks_in_image).

  torchvision's semantics: each M x M mask is zero-padded by `padding`, its
  box grown to match and truncated to integers (`paste_boxes`), the padded
  mask bilinearly resized (align_corners=False) to the integer box's
  (y2 - y1 + 1) x (x2 - x1 + 1) pixels and written there, clipped to the
  image. The resize is separable, columns first then rows (ATen's order),
  and each output pixel reads 2 x 2 source taps with a gather, so with a
  threshold XLA can fuse resize and comparison and materialise only the
  boolean output.

  Memory: the output is [..., D, H, W]; at 800 x 1216 with D = 100 that is
  97 MB a image as bool (4x as float32 probabilities, threshold=None).
  Callers that need other resolutions (e.g. the original image before
  resizing) can keep the M x M probabilities and boxes and paste later,
  with boxes scaled to that frame, as torchvision's transform.postprocess
  does.

  Args:
    mask_probs: [..., D, M, M] float probabilities (`class_mask_probs`).
    boxes: [..., D, 4] float (x1, y1, x2, y2) in the output frame's pixels.
    image_shape: static (H, W) of the output frame (e.g. the padded canvas).
    image_size: [..., 2] int true (height, width) within it; pixels past it
      are zero (torchvision pastes into the image itself). None: (H, W).
    valid: [..., D] bool; invalid slots paste nothing. None: all valid.
    padding: torchvision's 1 pixel of zeros around each mask.
    threshold: masks are `prob > threshold` (bool); None returns float32
      probabilities.

  Returns:
    [..., D, H, W] bool (or float32 with threshold=None).
  """
  probs = jnp.asarray(mask_probs, jnp.float32)
  m = probs.shape[-1]
  if probs.shape[-2] != m:
    raise ConfigError(f"paste_masks wants square masks [..., D, M, M], got {probs.shape}.")
  h, w = (int(s) for s in image_shape)
  lead = probs.shape[:-2]
  if image_size is None:
    image_size = jnp.array([h, w], jnp.int32)
  size = jnp.broadcast_to(jnp.asarray(image_size, jnp.int32), lead[:-1] + (2,))
  padded = jnp.pad(probs, [(0, 0)] * len(lead) + [(padding, padding)] * 2)
  s = m + 2 * padding
  ib = paste_boxes(boxes, m, padding)
  yi0, yi1, yw0, yw1 = _paste_axis(ib[..., 1], ib[..., 3], s, h, size[..., None, 0])
  xi0, xi1, xw0, xw1 = _paste_axis(ib[..., 0], ib[..., 2], s, w, size[..., None, 1])
  if valid is not None:
    keep = jnp.asarray(valid, bool)[..., None]
    yw0, yw1 = jnp.where(keep, yw0, 0.0), jnp.where(keep, yw1, 0.0)
  # Along x: [..., D, S, W], each source row resized to the box's width.
  cols = lambda i: jnp.take_along_axis(padded, i[..., None, :], axis=-1)  # noqa: E731
  rows = cols(xi0) * xw0[..., None, :] + cols(xi1) * xw1[..., None, :]
  # Along y: [..., D, H, W].
  pick = lambda i: jnp.take_along_axis(rows, i[..., :, None], axis=-2)  # noqa: E731
  out = pick(yi0) * yw0[..., :, None] + pick(yi1) * yw1[..., :, None]
  return out if threshold is None else out > threshold
