"""Mask R-CNN (He et al., ICCV 2017) and Faster R-CNN (Ren et al., NeurIPS
2015): the whole detector, training and inference.

`MaskRCNN` is MaskRCNNNetworks (same params, so segjax.convert's
"maskrcnn_resnet50_fpn" variables apply unchanged) plus the detector's
settings and two entry points, with torchvision's semantics
(generalized_rcnn.py, rpn.py, roi_heads.py) and static shapes throughout:

  model.apply(variables, images, image_size)          -> detections
  train_losses(model, variables, batch, rng)          -> losses, updates

Training, per batch (detection.targets / detection.proposals, one image
per call, vmapped):

  backbone -> RPN head -> rpn_targets (256 anchors, half positive)
           -> rpn_losses
           -> select_proposals (train sizes, no gradient)
           -> roi_targets (512 rois, 25 % positive, GT boxes appended)
           -> box head on the sampled rois -> box_head_losses
           -> mask head on the positive rois -> mask_targets -> mask_loss

Every loss is normalised over the batch as torchvision does (the count of
sampled anchors / sampled rois / positive rois of all images), so values
equal torchvision's for the same samples. The positives are gathered into
int(512 * 0.25) fixed slots per image (the sampler's cap), weighted by
whether a slot holds one: the mask head runs on a quarter of the rois
instead of all of them, as torchvision's does.

Inference: RPN with test sizes -> box head on the proposals ->
postprocess.select_detections -> mask head on the detections' boxes ->
each detection's class channel -> optionally pasted into the image.

Faster R-CNN is the same module with `masks=False`, as torchvision's
MaskRCNN is its FasterRCNN plus a mask branch: no mask head, so no mask
targets, no loss_mask and no mask outputs; everything else is shared.

Variants are data (`VARIANTS`, `build_detector`): "mask_rcnn_*" and
"faster_rcnn_*"; `TINY` shrinks any of them for CPU tests.
"""
import functools
import re
from typing import Any, Dict, Optional, Tuple

import flax
import jax
from flax import traverse_util
import jax.numpy as jnp

from segjax.errors import ConfigError
from segjax.models.detection import postprocess
from segjax.models.detection import targets as targets_lib
from segjax.models.detection.networks import MaskRCNNNetworks
from segjax.models.detection.proposals import select_proposals

Array = jax.Array
_sg = jax.lax.stop_gradient


class MaskRCNN(MaskRCNNNetworks):
  """Mask R-CNN: MaskRCNNNetworks plus proposals, targets, losses, post-processing.

  Calling the module detects (see `__call__`); `train_losses` trains. The
  settings below are torchvision's MaskRCNN keyword arguments, same names
  and defaults (the "fpn" layout). Per-level "pre" counts and the
  per-image "post" counts are static output sizes. With `masks=False`
  (MaskRCNNNetworks) it is Faster R-CNN, torchvision's FasterRCNN.

  Attributes (beyond MaskRCNNNetworks'):
    trainable_backbone_layers: ResNet stages trained, counted from the top
      (layer4, layer3, layer2, layer1, conv1): torchvision's 3 for an
      ImageNet-initialised backbone, 5 from scratch. See `trainable_mask`.
    rpn_pre_nms_top_n_train / _test: candidates per level before NMS.
    rpn_post_nms_top_n_train / _test: proposals per image after NMS.
    rpn_nms_thresh, rpn_fg_iou_thresh, rpn_bg_iou_thresh,
    rpn_batch_size_per_image, rpn_positive_fraction, rpn_score_thresh:
      the RPN's matcher, sampler and NMS settings.
    box_fg_iou_thresh, box_bg_iou_thresh, box_batch_size_per_image,
    box_positive_fraction: the ROI heads' matcher and sampler.
    box_score_thresh, box_nms_thresh, box_detections_per_img: inference.
    mask_max_sampling_ratio: static cap of ROI Align samples per bin when
      aligning mask targets from GT crops (targets.compact_mask_targets).
  """
  trainable_backbone_layers: int = 3
  rpn_pre_nms_top_n_train: int = 2000
  rpn_pre_nms_top_n_test: int = 1000
  rpn_post_nms_top_n_train: int = 2000
  rpn_post_nms_top_n_test: int = 1000
  rpn_nms_thresh: float = 0.7
  rpn_fg_iou_thresh: float = 0.7
  rpn_bg_iou_thresh: float = 0.3
  rpn_batch_size_per_image: int = 256
  rpn_positive_fraction: float = 0.5
  rpn_score_thresh: float = 0.0
  box_fg_iou_thresh: float = 0.5
  box_bg_iou_thresh: float = 0.5
  box_batch_size_per_image: int = 512
  box_positive_fraction: float = 0.25
  box_score_thresh: float = 0.05
  box_nms_thresh: float = 0.5
  box_detections_per_img: int = 100
  mask_max_sampling_ratio: int = 8

  def __post_init__(self):
    if not 0 <= self.trainable_backbone_layers <= 5:
      raise ConfigError(f"{self.kind}: trainable_backbone_layers must be in 0..5, "
                        f"got {self.trainable_backbone_layers}.")
    if self.masks and int(self.box_batch_size_per_image * self.box_positive_fraction) < 1:
      raise ConfigError("mask r-cnn: box_batch_size_per_image * box_positive_fraction "
                        "must allow at least one positive roi (the mask head's slots).")
    super().__post_init__()

  def _proposals(self, feats, canvas, sizes, train):
    """RPN outputs and proposals [N, P, 4] with their valid mask [N, P].

    canvas: static (H, W) of the batch; sizes: [N, 2] true image sizes.
    """
    objectness, deltas = self.rpn(feats)
    anchors = self.anchors(feats, canvas)
    pre = self.rpn_pre_nms_top_n_train if train else self.rpn_pre_nms_top_n_test
    post = self.rpn_post_nms_top_n_train if train else self.rpn_post_nms_top_n_test
    select = functools.partial(select_proposals, pre_nms_top_n=pre, post_nms_top_n=post,
                               nms_threshold=self.rpn_nms_thresh,
                               score_thresh=self.rpn_score_thresh)
    boxes, _, valid = jax.vmap(select, in_axes=(0, 0, None, 0))(
        objectness, deltas, anchors, sizes)
    # torchvision detaches the proposals: no gradient through box decoding.
    return objectness, deltas, anchors, _sg(boxes), valid

  def _heads(self, feats, rois, pick, train):
    """Box head on rois [N, R, 4]; mask head on the rois at `pick` [N, Q].

    Returns class_logits [N, R, K+1], box_deltas [N, R, K+1, 4] and
    mask_logits [N, Q, M, M, K+1] (None when pick is None: Faster R-CNN,
    or inference, which masks the detections instead). The C4 layout runs
    res5 once and feeds the picked rois' res5 output to the mask head
    (Detectron's shared res5).
    """
    n, r = rois.shape[:2]
    flat = rois.reshape(-1, 4)
    image_of = jnp.repeat(jnp.arange(n, dtype=jnp.int32), r)
    spec = self.spec
    pooled = self.pool(feats, flat, image_of, spec.box_pool)
    shared_res5 = self.layout == "c4" and spec.box_pool == spec.mask_pool
    if shared_res5:
      shared = self.res5(pooled, train=train)
      logits, deltas = self.box_head(jnp.mean(shared, axis=(1, 2)))
    else:
      logits, deltas = self.box_outputs(pooled, train)
    logits, deltas = logits.reshape(n, r, -1), deltas.reshape(n, r, -1, 4)
    if pick is None:
      return logits, deltas, None
    q = pick.shape[1]
    flat_pick = (pick + r * jnp.arange(n, dtype=pick.dtype)[:, None]).reshape(-1)
    if shared_res5:
      masks = self.mask_head(shared[flat_pick])
    else:
      masks = self.mask_outputs(self.pool(feats, flat[flat_pick], image_of[flat_pick],
                                          spec.mask_pool), train)
    return logits, deltas, masks.reshape((n, q) + masks.shape[1:])

  def __call__(self, images: Array, image_size: Optional[Array] = None,
               train: bool = False, paste: bool = True) -> Dict[str, Array]:
    """Detects objects and, with masks, their masks.

    Args:
      images: [N, H, W, 3] float, normalised, each image at the top-left of
        a padded canvas.
      image_size: [N, 2] int (height, width) of each image within the
        canvas; boxes are clipped to it. None: the whole canvas.
      train: BatchNorm mode (no effect with frozen_bn).
      paste: static; also return masks pasted into the canvas
        (`postprocess.paste_masks`). Under jit bind it with functools.partial.
        No effect without masks.

    Returns:
      {"boxes": [N, D, 4] float32 (x1, y1, x2, y2) canvas pixels,
      "scores": [N, D], "classes": [N, D] int32 (1..K, 0 in padding slots),
      "valid": [N, D] bool, and with masks "mask_probs": [N, D, M, M]
      float32 (M = 28 "fpn", 14 "c4", each in its box's frame) and with
      paste "masks": [N, D, H, W] bool (probability > 0.5)},
      D = box_detections_per_img.
    """
    n, h, w, _ = images.shape
    sizes = _image_sizes(image_size, n, (h, w))
    feats = self.features(images, train=train)
    _, _, _, props, props_valid = self._proposals(feats, (h, w), sizes, False)
    logits, deltas, _ = self._heads(feats, props, None, train)
    dets = postprocess.postprocess_detections(
        logits, deltas, props, props_valid, sizes, score_thresh=self.box_score_thresh,
        nms_thresh=self.box_nms_thresh, detections_per_img=self.box_detections_per_img)
    if not self.masks:
      return dets
    d = self.box_detections_per_img
    flat = dets["boxes"].reshape(-1, 4)
    image_of = jnp.repeat(jnp.arange(n, dtype=jnp.int32), d)
    mask_logits = self.mask_outputs(self.pool(feats, flat, image_of, self.spec.mask_pool),
                                    train)
    probs = postprocess.class_mask_probs(mask_logits, dets["classes"].reshape(-1))
    dets["mask_probs"] = probs.reshape((n, d) + probs.shape[1:])
    if paste:
      dets["masks"] = postprocess.paste_masks(dets["mask_probs"], dets["boxes"], (h, w),
                                              sizes, dets["valid"])
    return dets

  def losses(self, batch: Dict[str, Array], rng: Array, train: bool = True
             ) -> Dict[str, Array]:
    """The five Mask R-CNN losses (four without masks) of a batch and their
    sum (see `train_losses`)."""
    images = batch["image"]
    n, h, w, _ = images.shape
    sizes = _image_sizes(batch.get("image_size"), n, (h, w))
    gt_boxes = jnp.asarray(batch["boxes"], jnp.float32)
    gt_classes = jnp.asarray(batch["classes"], jnp.int32)
    gt_valid = jnp.asarray(batch["valid"], bool)
    k_rpn, k_roi = jax.random.split(rng)

    feats = self.features(images, train=train)
    objectness, deltas, anchors, props, props_valid = self._proposals(feats, (h, w), sizes, True)

    # RPN: one anchor set for the batch (anchors depend on the canvas only).
    rpn_t = functools.partial(targets_lib.rpn_targets, fg_iou=self.rpn_fg_iou_thresh,
                              bg_iou=self.rpn_bg_iou_thresh,
                              num_samples=self.rpn_batch_size_per_image,
                              positive_fraction=self.rpn_positive_fraction)
    labels, rpn_box_t = jax.vmap(rpn_t, in_axes=(0, None, 0, 0))(
        jax.random.split(k_rpn, n), jnp.concatenate(anchors, 0), gt_boxes, gt_valid)
    rpn_l = functools.partial(targets_lib.rpn_losses,
                              denominator=jnp.sum(labels >= 0).astype(jnp.float32))
    loss_obj, loss_rpn_box = jax.vmap(rpn_l)(
        jnp.concatenate(objectness, 1), jnp.concatenate(deltas, 1), labels, rpn_box_t)

    # ROI heads on sampled proposals (GT boxes appended inside roi_targets).
    roi_t = functools.partial(targets_lib.roi_targets,
                              num_samples=self.box_batch_size_per_image,
                              positive_fraction=self.box_positive_fraction,
                              fg_iou=self.box_fg_iou_thresh, bg_iou=self.box_bg_iou_thresh)
    rois, cls_t, box_t, matched, weights = jax.vmap(roi_t)(
        jax.random.split(k_roi, n), props, props_valid, gt_boxes, gt_classes, gt_valid)
    pick = None
    if self.masks:
      # Positives into fixed slots: at most int(S * fraction) per image, the
      # sampler's own cap, so none is ever dropped.
      q = int(self.box_batch_size_per_image * self.box_positive_fraction)
      pos = (cls_t > 0) & (weights > 0)
      pick = jax.vmap(lambda p: jnp.nonzero(p, size=q, fill_value=0)[0])(pos)
      pick_w = (jnp.arange(q) < jnp.sum(pos, axis=1, keepdims=True)).astype(jnp.float32)
    logits, box_deltas, mask_logits = self._heads(feats, rois, pick, train)

    box_l = functools.partial(targets_lib.box_head_losses, denominator=jnp.sum(weights))
    loss_cls, loss_box = jax.vmap(box_l)(logits, box_deltas, cls_t, box_t, weights)
    out = {"loss_objectness": jnp.sum(loss_obj), "loss_rpn_box_reg": jnp.sum(loss_rpn_box),
           "loss_classifier": jnp.sum(loss_cls), "loss_box_reg": jnp.sum(loss_box)}

    if self.masks:
      take = functools.partial(_take_slots, pick)
      pick_cls = jnp.where(pick_w > 0, take(cls_t), 0)
      m = mask_logits.shape[2]
      mask_t = jax.vmap(functools.partial(targets_lib.compact_mask_targets, mask_size=m,
                                          max_sampling_ratio=self.mask_max_sampling_ratio))(
          batch["mask_crops"], batch["mask_boxes"], take(rois), take(matched))
      mask_l = functools.partial(targets_lib.mask_loss, denominator=jnp.sum(pick_w))
      out["loss_mask"] = jnp.sum(jax.vmap(mask_l)(mask_logits, pick_cls, mask_t, pick_w))
    out["loss"] = sum(out.values())
    return out


def _take_slots(idx: Array, x: Array) -> Array:
  """x [N, S, ...] at slots idx [N, Q] -> [N, Q, ...]."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _image_sizes(image_size, n, canvas) -> Array:
  """[N, 2] int32 true sizes; None means every image fills the canvas."""
  if image_size is None:
    return jnp.tile(jnp.asarray([canvas], jnp.int32), (n, 1))
  return jnp.broadcast_to(jnp.asarray(image_size, jnp.int32), (n, 2))


_STAGE = re.compile(r"^layer(\d)_\d+$")


def _backbone_stage(path: Tuple[str, ...]) -> Optional[int]:
  """ResNet stage (0 = conv1 / bn1, 1..4 = layer1..4) of a param path, else None."""
  if path[0] == "backbone":
    # "fpn": backbone/body/<block>, "c4": backbone/<block>; backbone/fpn is FPN.
    rest = path[2:] if path[1] == "body" else path[1:]
    if path[1] == "fpn" or not rest:
      return None
  elif path[0] == "res5":
    rest = path[1:]
  else:
    return None
  if rest[0] in ("conv1", "bn1"):
    return 0
  match = _STAGE.match(rest[0])
  return int(match.group(1)) if match else None


def trainable_mask(model: MaskRCNN, params: Any) -> Any:
  """Which params train: a pytree of bools shaped like `params`.

  False for the ResNet stages below the top `trainable_backbone_layers`
  (torchvision sets requires_grad=False on them) and, with frozen_bn, for
  every BatchNorm scale and bias of the ResNet (torchvision's
  FrozenBatchNorm2d holds them as buffers). Everything else (FPN, RPN,
  heads) trains. Usable with optax.masked; `train_losses` applies it with
  stop_gradient.
  """
  flat = traverse_util.flatten_dict(flax.core.unfreeze(params))
  first = 5 - model.trainable_backbone_layers
  bn_modules = {p[:-1] for p in flat if p[-1] == "scale"}
  out = {}
  for path in flat:
    stage = _backbone_stage(path)
    frozen = stage is not None and (stage < first
                                    or (model.frozen_bn and path[:-1] in bn_modules))
    out[path] = not frozen
  return traverse_util.unflatten_dict(out)


def train_losses(model: MaskRCNN, variables: Any, batch: Dict[str, Array], rng: Array
                 ) -> Tuple[Dict[str, Array], Dict[str, Any]]:
  """A detector's training losses of one batch; differentiate w.r.t. variables["params"].

  Args:
    model: a MaskRCNN (masks=False: Faster R-CNN).
    variables: {"params": ..., "batch_stats": ...}.
    batch: "image" [N, H, W, 3] float normalised canvas; "image_size" [N, 2]
      int32 true (height, width) (optional: whole canvas); "boxes" [N, G, 4]
      (x1, y1, x2, y2) pixels; "classes" [N, G] int32 in 1..K (0 padding);
      "mask_crops" [N, G, C, C] each instance's mask over its box (uint8
      0..255, or float in [0, 1]) and "mask_boxes" [N, G, 4] the boxes
      they span (segjax.data.mask_crops;
      targets.compact_mask_targets aligns the mask targets from them),
      read only with model.masks; "valid" [N, G] bool. G >= 1 and fixed,
      so one compiled function serves every batch.
    rng: PRNG key for the anchor and roi samplers.

  Returns:
    losses: {"loss_objectness", "loss_rpn_box_reg", "loss_classifier",
      "loss_box_reg", "loss_mask" (only with masks), "loss" (their sum)},
      float32 scalars, normalised over the batch as torchvision's.
    updates: {} with frozen_bn (nothing to update); otherwise the new
      {"batch_stats": ...}.
    Params that `trainable_mask` freezes get zero gradient.
  """
  trains = traverse_util.flatten_dict(trainable_mask(model, variables["params"]))
  flat = traverse_util.flatten_dict(flax.core.unfreeze(variables["params"]))
  # stop_gradient rather than masking updates: XLA then skips the backward
  # pass through the frozen stem and layer1 altogether.
  params = traverse_util.unflatten_dict({k: v if trains[k] else _sg(v) for k, v in flat.items()})
  variables = {**variables, "params": params}
  if model.frozen_bn:
    return model.apply(variables, batch, rng, method=MaskRCNN.losses), {}
  out, updates = model.apply(variables, batch, rng, train=True, method=MaskRCNN.losses,
                             mutable=["batch_stats"])
  return out, dict(updates)


# The registry's variants: layout and depth, with or without the mask
# branch. The C4 RPN sees one level, so its per-level counts are Detectron's
# per-image ones (e2e_mask_rcnn_R-50-C4, e2e_faster_rcnn_R-50-C4).
_BACKBONES: Dict[str, Dict[str, Any]] = {
    "r50_fpn": dict(layout="fpn", stage_sizes=(3, 4, 6, 3)),
    "r101_fpn": dict(layout="fpn", stage_sizes=(3, 4, 23, 3)),
    "r50_c4": dict(layout="c4", stage_sizes=(3, 4, 6, 3),
                   rpn_pre_nms_top_n_train=12000, rpn_pre_nms_top_n_test=6000),
    "r101_c4": dict(layout="c4", stage_sizes=(3, 4, 23, 3),
                    rpn_pre_nms_top_n_train=12000, rpn_pre_nms_top_n_test=6000),
}
VARIANTS: Dict[str, Dict[str, Any]] = {
    **{f"mask_rcnn_{k}": dict(v, masks=True) for k, v in _BACKBONES.items()},
    **{f"faster_rcnn_{k}": dict(v, masks=False) for k, v in _BACKBONES.items()},
}

# Options that shrink any variant for CPU tests: a 16-wide ResNet with one
# block per stage, narrow heads, few proposals and rois.
TINY: Dict[str, Any] = dict(
    stage_sizes=(1, 1, 1, 1), width=16, fpn_channels=32, representation_size=64,
    mask_channels=16, rpn_pre_nms_top_n_train=200, rpn_pre_nms_top_n_test=100,
    rpn_post_nms_top_n_train=64, rpn_post_nms_top_n_test=32,
    rpn_batch_size_per_image=64, box_batch_size_per_image=32, box_detections_per_img=10,
    mask_max_sampling_ratio=2)


def build_detector(name: str, num_classes: int, **options) -> MaskRCNN:
  """A detector variant (Mask or Faster R-CNN): `VARIANTS[name]` updated with `options`.

  Args:
    name: a key of VARIANTS.
    num_classes: K + 1, background included (91 for COCO), as torchvision's.
    **options: MaskRCNN attributes, e.g. **TINY, or dtype=jnp.bfloat16;
      not `masks`, which the name fixes (the task trains and scores what
      the name says).

  Raises:
    ConfigError: for an unknown name or option.
  """
  if name not in VARIANTS:
    raise ConfigError(f"unknown detector variant {name!r}; choose one of "
                      f"{', '.join(sorted(VARIANTS))}.")
  fields = set(MaskRCNN.__dataclass_fields__) - {"parent", "name", "masks"}
  unknown = sorted(set(options) - fields)
  if unknown:
    raise ConfigError(f"{name} has no option(s) {', '.join(unknown)}; its options "
                      f"are: {', '.join(sorted(fields - {'num_classes'}))}.")
  return MaskRCNN(num_classes=num_classes, **{**VARIANTS[name], **options})
