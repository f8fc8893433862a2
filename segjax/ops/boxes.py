"""Box arithmetic for detection heads, matching torchvision.

Boxes are [K, 4] float (x1, y1, x2, y2) in pixels, with width x2 - x1 (no
"+1", as torchvision since 0.3). Everything is jit-safe with static shapes:
`nms` returns a fixed number of slots plus a validity mask.
"""
import math
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from segjax.errors import ConfigError

# Faster R-CNN caps predicted log-size deltas so exp() cannot overflow.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def box_area(boxes: jax.Array) -> jax.Array:
  """boxes: [..., 4] (x1, y1, x2, y2) -> [...] area (w * h)."""
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
  """Pairwise IoU, as torchvision.ops.box_iou.

  Args:
    boxes1: [N, 4]; boxes2: [M, 4] (x1, y1, x2, y2).

  Returns:
    [N, M] intersection over union (NaN where both boxes are empty, as in
    torchvision).
  """
  lt = jnp.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
  rb = jnp.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
  wh = jnp.maximum(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - inter
  return inter / union


def clip_boxes(boxes: jax.Array, size: Sequence[int]) -> jax.Array:
  """Clips [..., 4] boxes to an image of size (height, width)."""
  h, w = size
  x = jnp.clip(boxes[..., 0::2], 0, w)
  y = jnp.clip(boxes[..., 1::2], 0, h)
  return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)


def _centres(boxes):
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode_boxes(boxes: jax.Array, anchors: jax.Array,
                 weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> jax.Array:
  """Regression targets of `boxes` relative to `anchors` (torchvision BoxCoder.encode).

  Args:
    boxes: [..., 4] target boxes (e.g. matched ground truth).
    anchors: [..., 4] reference boxes (anchors or proposals).
    weights: (wx, wy, ww, wh), e.g. (10, 10, 5, 5) for the R-CNN box head.

  Returns:
    [..., 4] deltas (dx, dy, dw, dh).
  """
  wx, wy, ww, wh = weights
  ax, ay, aw, ah = _centres(anchors)
  gx, gy, gw, gh = _centres(boxes)
  return jnp.stack([wx * (gx - ax) / aw, wy * (gy - ay) / ah,
                    ww * jnp.log(gw / aw), wh * jnp.log(gh / ah)], axis=-1)


def decode_boxes(deltas: jax.Array, anchors: jax.Array,
                 weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 clip: float = BBOX_XFORM_CLIP) -> jax.Array:
  """Inverse of `encode_boxes` (torchvision BoxCoder.decode_single).

  Args:
    deltas: [..., 4] (dx, dy, dw, dh).
    anchors: [..., 4] reference boxes.
    weights: as in encode_boxes.
    clip: dw, dh are clamped to at most this, log(1000 / 16) by default.

  Returns:
    [..., 4] boxes (x1, y1, x2, y2).
  """
  wx, wy, ww, wh = weights
  ax, ay, aw, ah = _centres(anchors)
  dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
  dw = jnp.minimum(deltas[..., 2] / ww, clip)
  dh = jnp.minimum(deltas[..., 3] / wh, clip)
  cx, cy = dx * aw + ax, dy * ah + ay
  pw, ph = jnp.exp(dw) * aw, jnp.exp(dh) * ah
  return jnp.stack([cx - 0.5 * pw, cy - 0.5 * ph, cx + 0.5 * pw, cy + 0.5 * ph], axis=-1)


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
  """Zero-centred anchors of one level: [len(ratios) * len(sizes), 4].

  Ratio-major order, each rounded to integers (torch.round: halves to
  even), as torchvision's AnchorGenerator.generate_anchors.
  """
  scales = np.asarray(sizes, np.float32)
  ratios = np.asarray(aspect_ratios, np.float32)
  h_ratios = np.sqrt(ratios)
  w_ratios = np.float32(1) / h_ratios
  ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
  hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
  return np.round(np.stack([-ws, -hs, ws, hs], axis=1) / 2).astype(np.float32)


def anchor_grid(feature_size: Sequence[int], stride: Sequence[int],
                sizes: Sequence[float], aspect_ratios: Sequence[float]) -> jax.Array:
  """All anchors of one level: [H * W * A, 4], location-major (y, x, anchor).

  Args:
    feature_size: (H, W) of the feature map.
    stride: (sy, sx) image pixels per feature pixel, or an int.
    sizes, aspect_ratios: anchor sizes (sqrt of area) and h / w ratios.
  """
  h, w = feature_size
  sy, sx = (stride, stride) if isinstance(stride, (int, np.integer)) else stride
  base = cell_anchors(sizes, aspect_ratios)
  ys, xs = np.meshgrid(np.arange(h, dtype=np.float32) * sy,
                       np.arange(w, dtype=np.float32) * sx, indexing="ij")
  shifts = np.stack([xs, ys, xs, ys], axis=-1).reshape(-1, 1, 4)
  return jnp.asarray((shifts + base[None]).reshape(-1, 4))


def generate_anchors(feature_sizes: Sequence[Sequence[int]], strides: Sequence[int],
                     sizes: Sequence[Sequence[float]],
                     aspect_ratios: Sequence[Sequence[float]]) -> jax.Array:
  """Anchors of every FPN level, concatenated finest level first.

  Equals torchvision's AnchorGenerator for one image (its anchors do not
  depend on the image content). Shapes are static, so the result is a
  constant under jit.

  Args:
    feature_sizes: per level (H_l, W_l).
    strides: per level, image pixels per feature pixel (4, 8, 16, 32, 64).
    sizes: per level the anchor sizes, e.g. ((32,), (64,), (128,), ...).
    aspect_ratios: per level the h / w ratios, e.g. ((0.5, 1.0, 2.0),) * 5.

  Returns:
    [sum_l H_l * W_l * A_l, 4] (x1, y1, x2, y2).
  """
  if not len(feature_sizes) == len(strides) == len(sizes) == len(aspect_ratios):
    raise ConfigError(
        f"generate_anchors needs one stride, size list and ratio list per level; got "
        f"{len(feature_sizes)} levels, {len(strides)} strides, {len(sizes)} sizes, "
        f"{len(aspect_ratios)} aspect_ratios.")
  return jnp.concatenate([anchor_grid(f, s, z, a) for f, s, z, a
                          in zip(feature_sizes, strides, sizes, aspect_ratios)], axis=0)


def _iou_one(box, boxes):
  """IoU of one box [4] with boxes [N, 4] -> [N], torchvision's NMS formula."""
  lt = jnp.maximum(box[:2], boxes[:, :2])
  rb = jnp.minimum(box[2:], boxes[:, 2:])
  wh = jnp.maximum(rb - lt, 0.0)
  inter = wh[:, 0] * wh[:, 1]
  return inter / (box_area(box) + box_area(boxes) - inter)


def nms(boxes: jax.Array, scores: jax.Array, iou_threshold: float, max_output: int,
        classes: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array]:
  """Greedy non-maximum suppression, as torchvision.ops.nms, with static shapes.

  Repeatedly keeps the highest-scoring remaining box and removes the boxes
  whose IoU with it exceeds `iou_threshold`. Each step costs O(N) and there
  are at most `max_output` steps (the loop stops early when no candidate is
  left), so no N x N IoU matrix is built.

  Args:
    boxes: [N, 4] (x1, y1, x2, y2).
    scores: [N] float. Equal scores are taken lowest index first.
    iou_threshold: boxes with IoU > threshold are suppressed.
    max_output: static number of output slots.
    classes: optional [N] int; boxes only suppress boxes of their own class.

  Returns:
    indices: [max_output] int32 into boxes, kept boxes in descending score
      order (torchvision's order); unused slots hold 0.
    valid: [max_output] bool, True for the slots that hold a kept box.
  """
  if boxes.ndim != 2 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:1]:
    raise ConfigError(f"nms wants boxes [N, 4] and scores [N]; got {boxes.shape} "
                      f"and {scores.shape}.")
  if int(max_output) != max_output or max_output < 1:
    raise ConfigError(f"max_output must be a positive int, got {max_output!r}.")
  boxes = jax.lax.stop_gradient(jnp.asarray(boxes))
  scores = jax.lax.stop_gradient(jnp.asarray(scores))
  if classes is not None:
    classes = jnp.asarray(classes)
  n = boxes.shape[0]
  neg = jnp.array(-jnp.inf, scores.dtype)
  # Suppressed and kept boxes are marked by -inf; NaN scores never win.
  live = jnp.where(jnp.isnan(scores), neg, scores)
  out = jnp.zeros((max_output,), jnp.int32)

  def cond(state):
    i, live, _ = state
    return (i < max_output) & jnp.any(live > neg)

  def body(state):
    i, live, out = state
    best = jnp.argmax(live)
    iou = _iou_one(boxes[best], boxes)
    hit = iou > iou_threshold
    if classes is not None:
      hit &= classes == classes[best]
    live = jnp.where(hit, neg, live).at[best].set(neg)
    return i + 1, live, out.at[i].set(best.astype(jnp.int32))

  if n == 0:
    return out, jnp.zeros((max_output,), bool)
  count, _, out = jax.lax.while_loop(cond, body, (jnp.int32(0), live, out))
  return out, jnp.arange(max_output) < count


def batched_nms(boxes: jax.Array, scores: jax.Array, classes: jax.Array,
                iou_threshold: float, max_output: int) -> Tuple[jax.Array, jax.Array]:
  """NMS within each class (torchvision.ops.batched_nms), jointly ranked.

  Args:
    boxes: [N, 4]; scores: [N]; classes: [N] int category of each box.
    iou_threshold, max_output: as in `nms`.

  Returns:
    (indices [max_output] int32, valid [max_output] bool), kept boxes of all
    classes in descending score order, as torchvision returns them.
  """
  return nms(boxes, scores, iou_threshold, max_output, classes=classes)
