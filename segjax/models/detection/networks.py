"""Mask R-CNN's networks applied to given proposals, in two layouts.

`MaskRCNNNetworks` holds every learned part of Mask R-CNN (He et al. 2017):
backbone, RPN head, box head and mask head, with torchvision's param names,
and runs them on images and a given set of boxes. It is what
segjax.convert's "maskrcnn_resnet50_fpn" fills; the detector itself
(proposal selection, training targets and losses, post-processing) composes
it with detection.proposals and detection.targets.

With `masks=False` it is Faster R-CNN's (Ren et al. 2015): the same
backbone, RPN head and box head and no mask head, as torchvision's MaskRCNN
is its FasterRCNN plus a mask branch (segjax.convert's
"fasterrcnn_resnet50_fpn" fills it).

The two layouts of the paper are data, `LAYOUTS[name]`:

  "fpn"  ResNet-FPN (torchvision's maskrcnn_resnet50_fpn): RPN on P2..P6
         with one anchor size per level; ROIs pooled from P2..P5 by FPN
         level assignment, 7x7 for the box head (TwoMLPHead), 14x14 for the
         mask head (four convs, 28x28 masks).
  "c4"   ResNet-C4 (detection.c4): RPN on C4 with 15 anchors; ROIs pooled
         14x14 from C4 and put through res5 (7x7x2048), shared by the box
         predictor (after average pooling) and the mask predictor (14x14
         masks). torchvision has no C4 model, so no converter fills it.
"""
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.errors import ConfigError
from segjax.models.detection import c4 as c4_lib
from segjax.models.detection import fpn as fpn_lib
from segjax.models.detection import heads
from segjax.ops.boxes import anchor_grid
from segjax.ops.roi import multilevel_roi_align, roi_align

Array = jax.Array
Dtype = Any


class Layout(NamedTuple):
  """How one variant wires backbone features to its heads.

  rpn_features: feature maps the RPN and anchors use, finest first.
  anchor_sizes: per RPN level, anchor sizes (sqrt of the area, pixels).
  aspect_ratios: per RPN level, anchor h / w ratios.
  roi_features: feature maps ROIs are pooled from, finest first.
  roi_strides: their strides (powers of two; level assignment uses them).
  box_pool, mask_pool: ROI Align output sizes of the box and mask branches.
  sampling_ratio: ROI Align samples per bin and axis (<= 0: adaptive).
  aligned: ROI Align's half-pixel offset (False in the paper and torchvision).
  """
  rpn_features: Tuple[str, ...]
  anchor_sizes: Tuple[Tuple[float, ...], ...]
  aspect_ratios: Tuple[Tuple[float, ...], ...]
  roi_features: Tuple[str, ...]
  roi_strides: Tuple[int, ...]
  box_pool: int
  mask_pool: int
  sampling_ratio: int
  aligned: bool = False


LAYOUTS: Dict[str, Layout] = {
    # torchvision's maskrcnn_resnet50_fpn defaults.
    "fpn": Layout(rpn_features=fpn_lib.LEVELS,
                  anchor_sizes=((32,), (64,), (128,), (256,), (512,)),
                  aspect_ratios=((0.5, 1.0, 2.0),) * 5,
                  roi_features=("p2", "p3", "p4", "p5"),
                  roi_strides=(4, 8, 16, 32), box_pool=7, mask_pool=14,
                  sampling_ratio=2),
    # Detectron's e2e_mask_rcnn_R-50-C4: adaptive sampling (ratio 0).
    "c4": Layout(rpn_features=("c4",),
                 anchor_sizes=((32, 64, 128, 256, 512),),
                 aspect_ratios=((0.5, 1.0, 2.0),),
                 roi_features=("c4",), roi_strides=(16,), box_pool=14,
                 mask_pool=14, sampling_ratio=0),
}


class MaskRCNNNetworks(nn.Module):
  """Backbone + RPN head + box head + mask head of Mask R-CNN.

  Params ("fpn"): backbone/{body, fpn}, rpn_head, box_head/{fc6, fc7,
  predictor}, mask_head/{mask_fcn1..4, predictor}. ("c4"): backbone (stem
  and layer1-3), rpn_head, res5 (layer4_*), box_head (cls_score,
  bbox_pred), mask_head (conv5_mask, mask_fcn_logits). Without masks, the
  same less mask_head.

  Attributes:
    num_classes: K + 1, background included (torchvision's num_classes; 91
      for COCO).
    layout: a key of LAYOUTS.
    stage_sizes: ResNet blocks per stage; (3, 4, 6, 3) is ResNet-50.
    width: ResNet stem width (64); the other widths below are 256 / 1024 in
      the paper. Smaller values only make tests fast.
    fpn_channels: FPN output channels ("fpn").
    representation_size: fc6 / fc7 width ("fpn").
    masks: build and run the mask head (Mask R-CNN); False is Faster
      R-CNN: no mask_head params, no "mask_logits".
    mask_channels: mask head conv and transposed-conv channels (unused
      without masks).
    frozen_bn: BatchNorm with fixed statistics in backbone and res5.
    max_sampling_ratio: static cap for adaptive ROI Align ("c4").
    roi_impl: ROI Align implementation, "gather" or "einsum".
    dtype: compute dtype; params and BN statistics stay float32, logits and
      deltas come out float32.
    bn_axis_name: pmap axis for synchronised BN (only without frozen_bn).
    remat: recompute the backbone's (and res5's) Bottlenecks in the backward
      pass instead of storing their activations (segjax.models.remat).
    anchor_sizes: per RPN level, anchor sizes replacing the layout's
      (detectron2's ANCHOR_GENERATOR.SIZES), e.g. ((16,), (32,), (64,),
      (128,), (256,)) for small images; None keeps the layout's. The
      count per level must stay the layout's (the RPN head's outputs).
  """
  num_classes: int = 91
  layout: str = "fpn"
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  fpn_channels: int = 256
  representation_size: int = 1024
  masks: bool = True
  mask_channels: int = 256
  frozen_bn: bool = True
  max_sampling_ratio: int = 4
  roi_impl: str = "gather"
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None
  remat: bool = False
  anchor_sizes: Optional[Tuple[Tuple[float, ...], ...]] = None

  @property
  def kind(self) -> str:
    """"mask r-cnn" or "faster r-cnn", for messages."""
    return "mask r-cnn" if self.masks else "faster r-cnn"

  def __post_init__(self):
    if self.layout not in LAYOUTS:
      raise ConfigError(f"{self.kind}: unknown layout {self.layout!r}; "
                        f"choose one of {', '.join(sorted(LAYOUTS))}.")
    if self.anchor_sizes is not None:
      default = LAYOUTS[self.layout].anchor_sizes
      if [len(s) for s in self.anchor_sizes] != [len(s) for s in default]:
        raise ConfigError(
            f"{self.kind}: anchor_sizes={self.anchor_sizes} must have "
            f"{len(default)} level(s) of {[len(s) for s in default]} sizes, as "
            f"the {self.layout!r} layout's {default}.")
    if self.num_classes < 2:
      raise ConfigError(f"{self.kind}: num_classes counts the background and "
                        f"must be >= 2, got {self.num_classes}.")
    super().__post_init__()

  @property
  def spec(self) -> Layout:
    spec = LAYOUTS[self.layout]
    if self.anchor_sizes is None:
      return spec
    return spec._replace(anchor_sizes=tuple(tuple(s) for s in self.anchor_sizes))

  def setup(self):
    spec = self.spec
    common = dict(frozen_bn=self.frozen_bn, dtype=self.dtype,
                  bn_axis_name=self.bn_axis_name, remat=self.remat)
    self.rpn_head = heads.RPNHead(
        len(spec.anchor_sizes[0]) * len(spec.aspect_ratios[0]), self.dtype)
    if self.layout == "fpn":
      self.backbone = fpn_lib.ResNetFPN(self.stage_sizes, self.width,
                                        self.fpn_channels, **common)
      self.box_head = heads.BoxHead(self.num_classes, self.representation_size,
                                    self.dtype)
      if self.masks:
        self.mask_head = heads.MaskHead(self.num_classes,
                                        (self.mask_channels,) * 4,
                                        dim_reduced=self.mask_channels,
                                        dtype=self.dtype)
    else:
      self.backbone = c4_lib.ResNetC4(self.stage_sizes, self.width, **common)
      self.res5 = c4_lib.Res5Head(self.stage_sizes[-1], self.width, **common)
      self.box_head = heads.BoxPredictor(self.num_classes, self.dtype)
      if self.masks:
        self.mask_head = heads.MaskPredictor(self.num_classes,
                                             self.mask_channels,
                                             dtype=self.dtype)

  def features(self, images: Array, train: bool = False) -> Dict[str, Array]:
    """images [N, H, W, 3] -> {"p2".."p6"} ("fpn") or {"c4"}, in `dtype`."""
    return self.backbone(images, train=train)

  def rpn(self, features: Dict[str, Array]) -> Tuple[list, list]:
    """RPNHead over the layout's levels.

    Returns L objectness [N, A_l] and L deltas [N, A_l, 4], float32.
    """
    return self.rpn_head([features[k] for k in self.spec.rpn_features])

  def anchors(self, features: Dict[str, Array],
              image_shape: Sequence[int]) -> list:
    """Anchors of each RPN level, [H_l * W_l * A, 4], aligned with `rpn`.

    As torchvision's AnchorGenerator, a level's stride is the (padded)
    batch's image size // the level's size, per axis: 64 for P6 only when
    the image is a multiple of 64 (800 rows over P6's 13 give 61).

    Args:
      features: as returned by `features` (only shapes are read).
      image_shape: (H, W) of the image batch.
    """
    h, w = image_shape
    spec = self.spec
    out = []
    for name, sizes, ratios in zip(spec.rpn_features, spec.anchor_sizes,
                                   spec.aspect_ratios):
      fh, fw = features[name].shape[1:3]
      out.append(anchor_grid((fh, fw), (h // fh, w // fw), sizes, ratios))
    return out

  def pool(self, features: Dict[str, Array], boxes: Array,
           box_indices: Array, output_size: int) -> Array:
    """ROI Align of boxes [R, 4] (image pixels) -> [R, S, S, C].

    FPN: each box from its level (torchvision's MultiScaleRoIAlign); C4:
    all from C4.
    """
    spec = self.spec
    maps = [features[k] for k in spec.roi_features]
    scales = [1.0 / s for s in spec.roi_strides]
    kw = dict(max_sampling_ratio=self.max_sampling_ratio, impl=self.roi_impl)
    if len(maps) > 1:
      return multilevel_roi_align(maps, boxes, box_indices, output_size,
                                  scales, spec.sampling_ratio, spec.aligned,
                                  **kw)
    return roi_align(maps[0], boxes, box_indices, output_size, scales[0],
                     spec.sampling_ratio, spec.aligned, **kw)

  def box_outputs(self, pooled: Array, train: bool = False
                  ) -> Tuple[Array, Array]:
    """Box branch on pooled [R, box_pool, box_pool, C].

    Returns class_logits [R, K+1] and box_deltas [R, K+1, 4], float32.
    """
    if self.layout == "fpn":
      return self.box_head(pooled)
    return self.box_head(jnp.mean(self.res5(pooled, train=train), axis=(1, 2)))

  def mask_outputs(self, pooled: Array, train: bool = False) -> Array:
    """pooled [R, mask_pool, mask_pool, C] -> mask logits [R, M, M, K+1]."""
    if not self.masks:
      raise ConfigError(f"{self.kind}: masks=False has no mask head.")
    if self.layout == "fpn":
      return self.mask_head(pooled)
    return self.mask_head(self.res5(pooled, train=train))

  def __call__(self, images: Array, boxes: Optional[Array] = None,
               box_indices: Optional[Array] = None,
               train: bool = False) -> Dict[str, Any]:
    """Every network output for the given proposals.

    Args:
      images: [N, H, W, 3] float, normalised.
      boxes: [R, 4] (x1, y1, x2, y2) image pixels, the ROIs for both heads;
        None: one whole-image box per image (e.g. for init).
      box_indices: [R] int, the image of each box; None: all 0, or
        arange(N) when boxes is None.
      train: BatchNorm mode (no effect with frozen_bn).

    Returns:
      {"features": the backbone's dict, "objectness": L [N, A_l],
      "rpn_deltas": L [N, A_l, 4], "anchors": L [A_l, 4],
      "class_logits": [R, K+1], "box_deltas": [R, K+1, 4],
      "mask_logits": [R, M, M, K+1] (M = 28 "fpn", 14 "c4"; only with
      masks)}, float32 except the features.
    """
    n, h, w, _ = images.shape
    if boxes is None:
      boxes = jnp.tile(jnp.asarray([[0.0, 0.0, w, h]], jnp.float32), (n, 1))
      box_indices = jnp.arange(n, dtype=jnp.int32)
    elif box_indices is None:
      box_indices = jnp.zeros((boxes.shape[0],), jnp.int32)
    feats = self.features(images, train=train)
    objectness, deltas = self.rpn(feats)
    spec = self.spec
    out = {"features": feats, "objectness": objectness, "rpn_deltas": deltas,
           "anchors": self.anchors(feats, (h, w))}
    box_pooled = self.pool(feats, boxes, box_indices, spec.box_pool)
    if not self.masks:
      out["class_logits"], out["box_deltas"] = self.box_outputs(box_pooled, train)
      return out
    if self.layout == "c4" and spec.box_pool == spec.mask_pool:
      # Both branches read the same res5 output of the same ROIs: run it once.
      shared = self.res5(box_pooled, train=train)
      out["class_logits"], out["box_deltas"] = self.box_head(
          jnp.mean(shared, axis=(1, 2)))
      out["mask_logits"] = self.mask_head(shared)
      return out
    out["class_logits"], out["box_deltas"] = self.box_outputs(box_pooled, train)
    mask_pooled = self.pool(feats, boxes, box_indices, spec.mask_pool)
    out["mask_logits"] = self.mask_outputs(mask_pooled, train)
    return out
