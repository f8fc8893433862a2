"""Training targets and losses of Mask R-CNN with static shapes.

He et al. 2017, with the semantics of torchvision.models.detection (Matcher,
BalancedPositiveNegativeSampler, BoxCoder in _utils.py; the RPN's
assign_targets_to_anchors / compute_loss; RoIHeads.select_training_samples,
fastrcnn_loss, project_masks_on_boxes, maskrcnn_loss).

torchvision works on per-image lists of variable length. Here every function
takes one image with fixed shapes: ground truth is padded to G instances and
carries `gt_valid [G] bool`, and sampled sets come back in fixed-size slots
with a weight mask, so one compiled train step serves every batch. Batch
with `jax.vmap`.

Conventions: boxes are (x1, y1, x2, y2) in image pixels; G >= 1 (an image
without instances has one padding row); labels are int32
with 1 (or a class 1..K) = foreground, 0 = background, -1 = ignored.
Targets carry no gradient (inputs are wrapped in stop_gradient).

Loss normalisation: torchvision divides each loss by a count over the whole
batch (sampled anchors, sampled rois, positive rois). Each loss here divides
by the image's own count, so a vmapped mean over images equals torchvision
when every image has the same count (the RPN's 256 anchors, the 512 rois
once proposals are plentiful) but not in general (mask positives vary). For
torchvision's exact batch value pass `denominator` = the batch-total count
and sum over images, e.g.
  n = jnp.sum(weights)                           # all images
  loss = jnp.sum(jax.vmap(partial(box_head_losses, denominator=n))(...)[0])
"""
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from segjax.ops.boxes import box_iou, encode_boxes
from segjax.ops.roi import roi_align

_sg = jax.lax.stop_gradient
# Replaces reference and target boxes where no target is defined, so
# encode() gives exact zeros there instead of log(0) or 0 / 0.
_UNIT_BOX = np.array([0.0, 0.0, 1.0, 1.0], np.float32)


def match(iou: jax.Array, gt_valid: jax.Array, high: float, low: float,
          allow_low_quality: bool = False) -> Tuple[jax.Array, jax.Array]:
  """Assigns each prediction to a ground-truth box (torchvision's Matcher).

  Args:
    iou: [G, N] float, quality of each (ground truth, prediction) pair.
    gt_valid: [G] bool, False for padding rows, which never match.
    high: IoU >= high is foreground.
    low: IoU < low is background; [low, high) is ignored.
    allow_low_quality: for each valid GT, every prediction whose IoU with it
      equals that GT's best IoU (all ties) becomes foreground, matched to the
      prediction's own best GT (as torchvision; used by the RPN). Like
      torchvision this includes a best IoU of 0: a valid GT overlapping no
      prediction makes every prediction foreground whose IoU with it is 0.

  Returns:
    matched_gt: [N] int32, the matched GT index for foreground, 0 elsewhere
      (torchvision's `matches.clamp(min=0)`).
    labels: [N] int32, 1 foreground, 0 background, -1 ignored. All 0 when no
      GT is valid (torchvision's "background image").
  """
  gt_valid = jnp.asarray(gt_valid, bool)
  # NaN (IoU of two empty boxes) counts as no overlap; torchvision would
  # propagate it and call the pair a match.
  iou = jnp.nan_to_num(jnp.asarray(iou, jnp.float32), nan=0.0)
  iou = jnp.where(gt_valid[:, None], iou, -1.0)
  best = jnp.max(iou, axis=0)
  best_gt = jnp.argmax(iou, axis=0).astype(jnp.int32)   # first GT on ties, as torch
  labels = jnp.where(best >= high, 1, jnp.where(best < low, 0, -1))
  if allow_low_quality:
    per_gt = jnp.max(iou, axis=1)
    ties = (iou == per_gt[:, None]) & gt_valid[:, None]
    labels = jnp.where(jnp.any(ties, axis=0), 1, labels)
  labels = jnp.where(jnp.any(gt_valid), labels, 0).astype(jnp.int32)
  return jnp.where(labels == 1, best_gt, 0), labels


def sample(rng: jax.Array, labels: jax.Array, num_samples: int,
           positive_fraction: float) -> jax.Array:
  """Balanced random subset (torchvision's BalancedPositiveNegativeSampler).

  Takes min(#positives, int(num_samples * positive_fraction)) positives
  (labels >= 1) and then min(#negatives, num_samples - positives taken)
  negatives (labels == 0), each uniformly at random without replacement.
  A random priority per element and a static-size top_k stand in for
  torch.randperm.

  Args:
    rng: PRNG key.
    labels: [N] int, >= 1 positive (a class id is kept), 0 negative, < 0 ignored.
    num_samples: static total, e.g. 256 (RPN) or 512 (box head).
    positive_fraction: e.g. 0.5 (RPN) or 0.25 (box head).

  Returns:
    [N] int32: the sampled entries keep their label, the rest are -1.
  """
  labels = jnp.asarray(labels, jnp.int32)
  n = labels.shape[0]
  pos, neg = labels >= 1, labels == 0
  max_pos = int(num_samples * positive_fraction)
  num_pos = jnp.minimum(jnp.sum(pos), max_pos)
  num_neg = jnp.minimum(jnp.sum(neg), num_samples - num_pos)
  kpos, kneg = jax.random.split(rng)

  def pick(key, eligible, k, count):
    # Eligible entries get priorities in [0, 1), the rest -1, so the first
    # `count` (<= number eligible) of the top k are a uniform random subset.
    k = min(k, n)
    if k == 0:
      return jnp.zeros((n,), bool)
    prio = jnp.where(eligible, jax.random.uniform(key, (n,)), -1.0)
    _, idx = jax.lax.top_k(prio, k)
    return jnp.zeros((n,), bool).at[idx].set(jnp.arange(k) < count)

  take_pos = pick(kpos, pos, max_pos, num_pos)
  take_neg = pick(kneg, neg, num_samples, num_neg)
  return jnp.where(take_pos | take_neg, labels, -1)


def rpn_targets(rng: jax.Array, anchors: jax.Array, gt_boxes: jax.Array,
                gt_valid: jax.Array, *, fg_iou: float = 0.7, bg_iou: float = 0.3,
                num_samples: int = 256, positive_fraction: float = 0.5,
                weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)
                ) -> Tuple[jax.Array, jax.Array]:
  """Objectness labels and box targets of every anchor (RegionProposalNetwork).

  Args:
    rng: PRNG key for the sampler.
    anchors: [A, 4] (x1, y1, x2, y2), all levels concatenated.
    gt_boxes: [G, 4]; gt_valid: [G] bool.
    fg_iou, bg_iou: Matcher thresholds, with low-quality matches.
    num_samples, positive_fraction: sampler settings (256 anchors, half positive).
    weights: BoxCoder weights, (1, 1, 1, 1) for the RPN.

  Returns:
    labels: [A] int32, 1 / 0 for the sampled anchors, -1 for the rest.
    box_targets: [A, 4] deltas to the matched GT for every foreground anchor
      (sampled or not), 0 elsewhere.
  """
  anchors = _sg(jnp.asarray(anchors, jnp.float32))
  gt_boxes = _sg(jnp.asarray(gt_boxes, jnp.float32))
  matched, labels = match(box_iou(gt_boxes, anchors), gt_valid, fg_iou, bg_iou, True)
  fg = (labels == 1)[:, None]
  targets = encode_boxes(jnp.where(fg, gt_boxes[matched], anchors), anchors, weights)
  return sample(rng, labels, num_samples, positive_fraction), jnp.where(fg, targets, 0.0)


def roi_targets(rng: jax.Array, proposals: jax.Array, proposals_valid: jax.Array,
                gt_boxes: jax.Array, gt_classes: jax.Array, gt_valid: jax.Array, *,
                num_samples: int = 512, positive_fraction: float = 0.25,
                fg_iou: float = 0.5, bg_iou: float = 0.5,
                box_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0)):
  """Sampled rois and their box-head targets (RoIHeads.select_training_samples).

  The GT boxes are appended to the proposals (so every valid GT is a
  candidate), candidates are matched without low-quality matches, and
  `num_samples` are drawn with `sample`. The sampled candidates fill the
  output slots in candidate order (torchvision's torch.where order); slots
  past their count are padding with weight 0.

  Args:
    rng: PRNG key for the sampler.
    proposals: [P, 4]; proposals_valid: [P] bool (e.g. `select_proposals`).
    gt_boxes: [G, 4]; gt_classes: [G] int32 in 1..K; gt_valid: [G] bool.
    num_samples, positive_fraction: sampler settings (512, 0.25).
    fg_iou, bg_iou: Matcher thresholds (both 0.5 in torchvision).
    box_weights: BoxCoder weights of the box head.

  Returns:
    rois: [S, 4] sampled boxes (zeros in padding slots), S = num_samples.
    class_targets: [S] int32, the GT class for positives, 0 otherwise.
    box_targets: [S, 4] deltas to the matched GT (box_weights), 0 for
      background and padding.
    matched_gt: [S] int32 GT index of positives, 0 otherwise.
    weights: [S] float32, 1 for sampled rois, 0 for padding slots.
  """
  proposals = _sg(jnp.asarray(proposals, jnp.float32))
  gt_boxes = _sg(jnp.asarray(gt_boxes, jnp.float32))
  gt_valid = jnp.asarray(gt_valid, bool)
  cands = jnp.concatenate([proposals, gt_boxes], axis=0)
  valid = jnp.concatenate([jnp.asarray(proposals_valid, bool), gt_valid], axis=0)
  matched, labels = match(box_iou(gt_boxes, cands), gt_valid, fg_iou, bg_iou, False)
  labels = jnp.where(labels == 1, jnp.asarray(gt_classes, jnp.int32)[matched], labels)
  labels = sample(rng, jnp.where(valid, labels, -1), num_samples, positive_fraction)
  chosen = labels >= 0
  idx = jnp.nonzero(chosen, size=num_samples, fill_value=0)[0]
  slot = jnp.arange(num_samples) < jnp.sum(chosen)
  rois = jnp.where(slot[:, None], cands[idx], 0.0)
  classes = jnp.where(slot, labels[idx], 0)
  pos = classes > 0
  gt = jnp.where(pos, matched[idx], 0)
  box_targets = encode_boxes(jnp.where(pos[:, None], gt_boxes[gt], _UNIT_BOX),
                             jnp.where(pos[:, None], rois, _UNIT_BOX), box_weights)
  return rois, classes, box_targets, gt, slot.astype(jnp.float32)


def mask_targets(gt_masks: jax.Array, rois: jax.Array, matched_gt: jax.Array,
                 mask_size: int = 28, *, max_sampling_ratio: int = 8) -> jax.Array:
  """GT masks cropped and resized to each roi (project_masks_on_boxes).

  roi_align of the matched GT mask with spatial_scale 1, adaptive sampling
  (ceil(roi_size / mask_size) samples per bin) and aligned=False: exactly
  torchvision's targets, from image-sized masks. Training aligns them from
  box crops instead (`compact_mask_targets`), which need a fraction of the
  bytes and of the work.

  Args:
    gt_masks: [G, H, W] float (or bool / int) instance masks, image pixels.
    rois: [R, 4] (x1, y1, x2, y2).
    matched_gt: [R] int, the GT instance of each roi.
    mask_size: M, the side of the targets (28).
    max_sampling_ratio: static cap on adaptive samples per bin and axis; a
      roi larger than max_sampling_ratio * M pixels on a side is sampled with
      that many evenly spaced points per bin instead of torchvision's count
      (see segjax.ops.roi). Cost grows with its square.

  Returns:
    [R, M, M] float32 soft mask targets in [0, 1].
  """
  masks = _sg(jnp.asarray(gt_masks, jnp.float32))[..., None]
  out = roi_align(masks, _sg(jnp.asarray(rois, jnp.float32)), jnp.asarray(matched_gt, jnp.int32),
                  (mask_size, mask_size), 1.0, -1, False,
                  max_sampling_ratio=max_sampling_ratio)
  return out[..., 0]


def compact_mask_targets(crops: jax.Array, crop_boxes: jax.Array, rois: jax.Array,
                         matched_gt: jax.Array, mask_size: int = 28, *,
                         max_sampling_ratio: int = 8) -> jax.Array:
  """`mask_targets` from box crops of the GT masks instead of whole masks.

  Each crop holds its instance's mask over crop_boxes[g], pixel j's value
  centred at x1 + (j + 1/2) (x2 - x1) / C (segjax.data.mask_crops).
  A roi maps into its matched crop's frame by x' = (x - x1) * C / (x2 - x1)
  (y alike) and is ROI-aligned there, with the sample counts adaptive to
  the roi's size in crop pixels. As in torchvision's roi_align with
  aligned=False the roi is at least 1 x 1 image pixel and image pixel k is
  read at x = k, not at its centre k + 1/2, so the roi moves by half an
  image pixel before mapping; the crop's frame itself is centred (aligned).

  The result approaches `mask_targets` of the whole masks as C grows (the
  module docstring of segjax.data.instances has figures); equal when the
  crop is the whole (square) mask at its own size. Outside its box a crop
  reads as its border row for half a crop pixel, then 0.

  Args:
    crops: [G, C, C] instance mask crops: uint8 0..255, else float in [0, 1].
    crop_boxes: [G, 4] (x1, y1, x2, y2) image pixels each crop spans; rows
      without area (padding) give targets of no meaning.
    rois: [R, 4] (x1, y1, x2, y2) image pixels.
    matched_gt: [R] int, the GT instance of each roi.
    mask_size: M, the side of the targets (28).
    max_sampling_ratio: static cap on the fast grid's samples per bin and
      axis (segjax.ops.roi; a cost knob). Rois needing more are read exactly
      through dense [M, C] weights, which on a C x C crop are cheap.

  Returns:
    [R, M, M] float32 soft mask targets in [0, 1].
  """
  crops = jnp.asarray(crops)
  scale = 1.0 / 255.0 if jnp.issubdtype(crops.dtype, jnp.integer) else 1.0
  c = crops.shape[-1]
  matched_gt = jnp.asarray(matched_gt, jnp.int32)
  box = _sg(jnp.asarray(crop_boxes, jnp.float32))[matched_gt]
  roi = _sg(jnp.asarray(rois, jnp.float32))
  # A box without area would divide by zero; its targets are never weighed.
  box = jnp.where(((box[:, 2:] > box[:, :2]).all(-1))[:, None], box, _UNIT_BOX)
  x1, y1 = roi[:, 0], roi[:, 1]
  x2 = x1 + jnp.maximum(roi[:, 2] - x1, 1.0)
  y2 = y1 + jnp.maximum(roi[:, 3] - y1, 1.0)
  start = jnp.tile(box[:, :2], 2)
  per_pixel = jnp.tile(c / (box[:, 2:] - box[:, :2]), 2)
  in_crop = (jnp.stack([x1, y1, x2, y2], -1) + 0.5 - start) * per_pixel

  def one(crop, box):
    # One crop at a time: the exact path's dense weights are then [M, C],
    # not [M, G * C] (vmapped, a lax.cond runs both of roi_align's paths).
    return roi_align(crop[None, :, :, None], box[None], jnp.zeros((1,), jnp.int32),
                     (mask_size, mask_size), 1.0, -1, True,
                     max_sampling_ratio=max_sampling_ratio)[0, ..., 0]

  picked = _sg(crops[matched_gt].astype(jnp.float32) * scale)
  return jax.vmap(one)(picked, in_crop)


def smooth_l1(x: jax.Array, beta: float) -> jax.Array:
  """Elementwise torch smooth_l1 of the difference x: 0.5 x^2 / beta or |x| - beta / 2."""
  a = jnp.abs(x)
  return jnp.where(a < beta, 0.5 * a * a / beta, a - 0.5 * beta)


def _bce_with_logits(x, t):
  """Elementwise binary cross-entropy of logits x against targets t, stable form."""
  return jnp.maximum(x, 0.0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _safe_div(num, den):
  return num / jnp.maximum(den, 1.0)


def rpn_losses(objectness: jax.Array, deltas: jax.Array, labels: jax.Array,
               box_targets: jax.Array, *, beta: float = 1.0 / 9,
               denominator: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array]:
  """RPN objectness and box losses (RegionProposalNetwork.compute_loss).

  Args:
    objectness: [A] logits; deltas: [A, 4], in the order of the anchors.
    labels: [A] from `rpn_targets` (1 / 0 sampled, -1 not sampled).
    box_targets: [A, 4] from `rpn_targets`.
    beta: smooth-L1 beta (1/9).
    denominator: overrides the number of sampled anchors (see module doc).

  Returns:
    objectness_loss: sum of BCE-with-logits over sampled anchors / count
      (torchvision: the mean over the batch's sampled anchors).
    box_loss: sum of smooth-L1 over the 4 deltas of sampled positives / count
      (the number of sampled anchors, positive and negative).
  """
  x = objectness.astype(jnp.float32)
  sampled, pos = labels >= 0, labels == 1
  count = jnp.sum(sampled).astype(jnp.float32) if denominator is None else denominator
  bce = _bce_with_logits(x, pos.astype(jnp.float32))
  l1 = smooth_l1(deltas.astype(jnp.float32) - box_targets, beta).sum(-1)
  return (_safe_div(jnp.sum(jnp.where(sampled, bce, 0.0)), count),
          _safe_div(jnp.sum(jnp.where(pos, l1, 0.0)), count))


def box_head_losses(class_logits: jax.Array, box_deltas: jax.Array,
                    class_targets: jax.Array, box_targets: jax.Array, weights: jax.Array,
                    *, beta: float = 1.0 / 9,
                    denominator: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array]:
  """Fast R-CNN classification and box losses (torchvision's fastrcnn_loss).

  Args:
    class_logits: [R, K + 1], class 0 = background.
    box_deltas: [R, K + 1, 4] or [R, (K + 1) * 4], class-specific deltas.
    class_targets, box_targets, weights: [R], [R, 4], [R] from `roi_targets`.
    beta: smooth-L1 beta (1/9).
    denominator: overrides sum(weights), the number of sampled rois.

  Returns:
    classification_loss: sum of weighted softmax cross-entropy / count.
    box_loss: smooth-L1 of the GT class's deltas over positive rois, summed
      over rois and the 4 deltas, / count (all sampled rois, not positives).
  """
  logits = class_logits.astype(jnp.float32)
  r = logits.shape[0]
  w = jnp.asarray(weights, jnp.float32)
  cls = jnp.asarray(class_targets, jnp.int32)
  count = jnp.sum(w) if denominator is None else denominator
  ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, cls[:, None], -1)[:, 0]
  deltas = box_deltas.astype(jnp.float32).reshape(r, -1, 4)
  picked = jnp.take_along_axis(deltas, cls[:, None, None], 1)[:, 0]
  l1 = smooth_l1(picked - box_targets, beta).sum(-1)
  pos = (cls > 0) & (w > 0)
  return (_safe_div(jnp.sum(w * ce), count),
          _safe_div(jnp.sum(jnp.where(pos, w * l1, 0.0)), count))


def mask_loss(mask_logits: jax.Array, class_targets: jax.Array, mask_targets: jax.Array,
              weights: jax.Array, *, denominator: Optional[jax.Array] = None) -> jax.Array:
  """Mask R-CNN mask loss (torchvision's maskrcnn_loss).

  Per-pixel sigmoid BCE of the GT class's mask only, over positive rois.

  Args:
    mask_logits: [R, M, M, K + 1] channels-last (torchvision's [R, K + 1, M, M]
      moved to NHWC); channel c is class c, so channel 0 is never read.
    class_targets: [R] int, 0 for background rois (which are skipped).
    mask_targets: [R, M, M] from `mask_targets`.
    weights: [R], 0 for padding slots.
    denominator: overrides the number of positive rois (then times M * M).

  Returns:
    Scalar: mean BCE over the positive rois' M * M pixels (0 without positives,
    as torchvision).
  """
  cls = jnp.asarray(class_targets, jnp.int32)
  x = jnp.take_along_axis(mask_logits.astype(jnp.float32), cls[:, None, None, None], -1)[..., 0]
  pos = (cls > 0) & (jnp.asarray(weights) > 0)
  per_roi = _bce_with_logits(x, mask_targets.astype(jnp.float32)).sum((1, 2))
  count = jnp.sum(pos).astype(jnp.float32) if denominator is None else denominator
  return _safe_div(jnp.sum(jnp.where(pos, per_roi, 0.0)), count) / (x.shape[1] * x.shape[2])
