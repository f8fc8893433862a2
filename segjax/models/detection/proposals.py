"""RPN proposal selection with static shapes (torchvision's filter_proposals).

Per image: the pre_nms_top_n highest-objectness anchors of every FPN level
are decoded, clipped to the image, stripped of tiny and low-scoring boxes,
suppressed with NMS within each level, and the post_nms_top_n best survivors
of all levels are kept. torchvision returns a variable number of boxes; here
they fill post_nms_top_n slots with a validity mask, so the box head can be
compiled once. Batch with `jax.vmap` (image_size may then be a per-image
[2] array).
"""
from typing import Sequence, Tuple, Union

import jax
import jax.numpy as jnp

from segjax.errors import ConfigError
from segjax.ops.boxes import batched_nms, clip_boxes, decode_boxes

_sg = jax.lax.stop_gradient


def select_proposals(objectness: Sequence[jax.Array], deltas: Sequence[jax.Array],
                     anchors: Sequence[jax.Array],
                     image_size: Union[Sequence[int], jax.Array],
                     pre_nms_top_n: int, post_nms_top_n: int,
                     nms_threshold: float = 0.7, min_size: float = 1e-3,
                     score_thresh: float = 0.0,
                     weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)
                     ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Region proposals of one image from the RPN outputs.

  Args:
    objectness: L arrays [A_l] (or any shape with A_l elements), logits of
      each level's anchors.
    deltas: L arrays [A_l, 4], box deltas in the same anchor order.
    anchors: L arrays [A_l, 4] (x1, y1, x2, y2), e.g. one `anchor_grid` per level.
    image_size: (height, width) of the image before padding, ints or a
      traced [2] array; boxes are clipped to it.
    pre_nms_top_n: static, candidates kept per level before NMS (torchvision
      2000 train / 1000 test for FPN); a level with fewer anchors keeps all.
    post_nms_top_n: static number of output slots (2000 train / 1000 test).
    nms_threshold: NMS IoU threshold within a level (0.7).
    min_size: boxes with a side < min_size after clipping are dropped.
    score_thresh: boxes with sigmoid(objectness) < score_thresh are dropped
      (torchvision's 0.0 drops only NaN).
    weights: BoxCoder weights, (1, 1, 1, 1) for the RPN.

  Returns:
    boxes: [post_nms_top_n, 4] kept proposals in descending score order,
      zeros in padding slots.
    scores: [post_nms_top_n] sigmoid(objectness), 0 in padding slots.
    valid: [post_nms_top_n] bool, True for the slots holding a proposal.
    No gradient flows to objectness or deltas (torchvision detaches both).
  """
  if not len(objectness) == len(deltas) == len(anchors) or not objectness:
    raise ConfigError(
        f"select_proposals needs the same number (>= 1) of objectness, deltas and anchor "
        f"levels; got {len(objectness)}, {len(deltas)} and {len(anchors)}.")
  if int(pre_nms_top_n) < 1 or int(post_nms_top_n) < 1:
    raise ConfigError(f"pre_nms_top_n and post_nms_top_n must be positive, got "
                      f"{pre_nms_top_n} and {post_nms_top_n}.")
  logits, boxes, levels = [], [], []
  for level, (o, d, a) in enumerate(zip(objectness, deltas, anchors)):
    o = _sg(jnp.asarray(o, jnp.float32)).reshape(-1)
    d = _sg(jnp.asarray(d, jnp.float32)).reshape(-1, 4)
    a = jnp.asarray(a, jnp.float32).reshape(-1, 4)
    if not o.shape[0] == d.shape[0] == a.shape[0]:
      raise ConfigError(f"level {level}: {o.shape[0]} objectness logits, {d.shape[0]} "
                        f"deltas and {a.shape[0]} anchors; they must be equal.")
    k = min(int(pre_nms_top_n), o.shape[0])
    top, idx = jax.lax.top_k(o, k)
    # Decoding only the top k is the same as torchvision's decode-all-then-gather.
    logits.append(top)
    boxes.append(decode_boxes(d[idx], a[idx], weights))
    levels.append(jnp.full((k,), level, jnp.int32))
  logits = jnp.concatenate(logits)
  boxes = clip_boxes(jnp.concatenate(boxes), image_size)
  levels = jnp.concatenate(levels)
  scores = jax.nn.sigmoid(logits)
  keep = ((boxes[:, 2] - boxes[:, 0] >= min_size) & (boxes[:, 3] - boxes[:, 1] >= min_size)
          & (scores >= score_thresh))
  # NMS ranks by the logit: the same order as the probability, but float32
  # sigmoid saturates to 1.0 above ~17, which would turn distinct logits
  # into ties. Dropped boxes rank -inf, so they neither win nor suppress.
  rank = jnp.where(keep, logits, -jnp.inf)
  idx, valid = batched_nms(boxes, rank, levels, nms_threshold, int(post_nms_top_n))
  return (jnp.where(valid[:, None], boxes[idx], 0.0), jnp.where(valid, scores[idx], 0.0),
          valid)
