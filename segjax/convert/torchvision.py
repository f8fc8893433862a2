"""Mapping tables for torchvision models: the ResNet and VGG ImageNet
backbones, fcn_resnet50/101, deeplabv3_resnet50/101,
fasterrcnn_resnet50_fpn and maskrcnn_resnet50_fpn."""
import re
from typing import Callable, Dict, List, Sequence, Tuple

from segjax.convert import engine
from segjax.errors import CheckpointError
from segjax.models import fcn as fcn_lib
from segjax.models import layers
from segjax.models import torchvision_seg
from segjax.models.backbones import resnet as resnet_lib
from segjax.models.backbones import vgg as vgg_lib
from segjax.models.detection import networks as detection_networks


# --- mapping tables ---------------------------------------------------------


def resnet_rows(torch_prefix: str, flax_path: Tuple[str, ...],
                stage_sizes: Sequence[int]) -> List[engine.Row]:
  """Rows for a torchvision ResNet (Bottleneck) under `torch_prefix`."""
  rows = [(engine.join(torch_prefix, "conv1"), flax_path + ("conv1",), "conv"),
          (engine.join(torch_prefix, "bn1"), flax_path + ("bn1",), "bn")]
  for s, size in enumerate(stage_sizes, 1):
    for b in range(size):
      t = engine.join(torch_prefix, f"layer{s}.{b}")
      f = flax_path + (f"layer{s}_{b}",)
      for i in (1, 2, 3):
        rows.append((f"{t}.conv{i}", f + (f"conv{i}",), "conv"))
        rows.append((f"{t}.bn{i}", f + (f"bn{i}",), "bn"))
      if b == 0:
        rows.append((f"{t}.downsample.0", f + ("downsample_conv",), "conv"))
        rows.append((f"{t}.downsample.1", f + ("downsample_bn",), "bn"))
  return rows


def vgg_rows(torch_prefix: str, flax_path: Tuple[str, ...],
             stage_sizes: Sequence[int], batch_norm: bool) -> List[engine.Row]:
  """Rows for torchvision's VGG `features` Sequential under `torch_prefix`.

  Its indices count every layer: conv, (BN,) ReLU per conv, then a pool.
  """
  rows, index = [], 0
  for stage, size in enumerate(stage_sizes, 1):
    for i in range(1, size + 1):
      rows.append((engine.join(torch_prefix, str(index)),
                   flax_path + (f"conv{stage}_{i}",), "conv"))
      index += 1
      if batch_norm:
        rows.append((engine.join(torch_prefix, str(index)),
                     flax_path + (f"bn{stage}_{i}",), "bn"))
        index += 1
      index += 1  # ReLU
    index += 1  # MaxPool2d
  return rows


def _fcn_head_rows(torch_prefix: str,
                   flax_path: Tuple[str, ...]) -> List[engine.Row]:
  # Sequential(conv, BN, ReLU, Dropout, conv).
  return [(f"{torch_prefix}.0", flax_path + ("block", "conv"), "conv"),
          (f"{torch_prefix}.1", flax_path + ("block", "bn"), "bn"),
          (f"{torch_prefix}.4", flax_path + ("head",), "conv")]


def _deeplab_head_rows(num_rates: int) -> List[engine.Row]:
  # Sequential(ASPP, conv, BN, ReLU, conv); ASPP.convs[i] is Sequential(conv,
  # BN, ReLU) except the pooling branch, Sequential(pool, conv, BN, ReLU).
  rows = []
  for i in range(num_rates + 2):
    first = 1 if i == num_rates + 1 else 0
    f = ("classifier", "aspp", f"convs_{i}")
    rows.append((f"classifier.0.convs.{i}.{first}", f + ("conv",), "conv"))
    rows.append((f"classifier.0.convs.{i}.{first + 1}", f + ("bn",), "bn"))
  rows += [("classifier.0.project.0", ("classifier", "aspp", "project", "conv"),
            "conv"),
           ("classifier.0.project.1", ("classifier", "aspp", "project", "bn"),
            "bn"),
           ("classifier.1", ("classifier", "block", "conv"), "conv"),
           ("classifier.2", ("classifier", "block", "bn"), "bn"),
           ("classifier.4", ("classifier", "head"), "conv")]
  return rows


# --- mapping functions: (state, **kwargs) -> Conversion ----------------------


def _seg_model(model_cls, state, num_classes=None, aux=None, **kwargs):
  head_key = "classifier.4.weight"  # the final 1x1 conv of both heads
  if num_classes is None:
    if head_key not in state:
      raise CheckpointError(
          f"the checkpoint has no {head_key}, so the number of classes is "
          "unknown; pass num_classes=..., and check that this is a "
          "torchvision segmentation state dict.")
    num_classes = int(state[head_key].shape[0])
  if aux is None:
    # torchvision's checkpoints carry the aux head whenever it was trained
    # with one (aux_loss=True); follow the checkpoint unless told otherwise.
    aux = any(k.startswith("aux_classifier.") for k in state)
  model = model_cls(num_classes=num_classes, aux=aux, **kwargs)
  rows = resnet_rows("backbone", ("backbone",), model.stage_sizes)
  if model_cls is torchvision_seg.DeepLabV3ResNet:
    rows += _deeplab_head_rows(len(model.rates))
  else:
    rows += _fcn_head_rows("classifier", ("classifier",))
  if aux:
    rows += _fcn_head_rows("aux_classifier", ("aux_classifier",))
  hints = engine.classes_hint(state, head_key, num_classes)
  if not aux and any(k.startswith("aux_classifier.") for k in state):
    hints.append("the checkpoint has an auxiliary head (aux_classifier.*); "
                 "pass aux=True to keep it.")
  return engine.Conversion(model, rows, state, hints)


def _fcn_resnet(state, num_classes=None, aux=None, **kwargs):
  return _seg_model(torchvision_seg.FCNResNet, state, num_classes, aux,
                    **kwargs)


def _deeplab_v3_resnet(state, num_classes=None, aux=None, **kwargs):
  return _seg_model(torchvision_seg.DeepLabV3ResNet, state, num_classes, aux,
                    **kwargs)


def _resnet101(converter):
  """The ResNet-101 variant of a torchvision segmentation converter."""
  return lambda state, **kwargs: converter(
      state, stage_sizes=torchvision_seg.RESNET101_STAGES, **kwargs)


def _resnet(stage_sizes):
  def mapping(state, **kwargs):
    # torchvision's resnet50().state_dict() ends in the ImageNet classifier
    # "fc"; the backbone has none.
    state = engine.strip_prefix(state, "fc.")
    model = resnet_lib.ResNet(stage_sizes=stage_sizes, **kwargs)
    return engine.Conversion(model, resnet_rows("", (), stage_sizes), state)
  return mapping


def _vgg(batch_norm):
  def mapping(state, **kwargs):
    # Accepts vgg16().features.state_dict() ("0.weight", ...) and the whole
    # vgg16().state_dict() ("features.0.weight", ..., "classifier.*"), whose
    # fully connected classifier the backbone has no use for.
    if state and all(k.startswith(("features.", "classifier."))
                     for k in state):
      state = {k[len("features."):]: v for k, v in state.items()
               if k.startswith("features.")}
    model = vgg_lib.VGG(batch_norm=batch_norm, **kwargs)
    return engine.Conversion(model, vgg_rows("", (), model.stage_sizes,
                                        batch_norm), state)
  return mapping


def _vgg16_fc(state, **kwargs):
  """torchvision vgg16().state_dict() -> fcn.VGGFC (FCN's params["backbone"]).

  The classifier's Linear layers 0 (fc6, 25088 -> 4096) and 3 (fc7) become
  the 7x7 and 1x1 convs fc6 and fc7; layer 6, the ImageNet fc8, is dropped.
  """
  state = engine.strip_prefix(state, "classifier.6.")
  model = fcn_lib.VGGFC(**kwargs)
  rows = vgg_rows("features", ("features",), model.stage_sizes, False)
  rows += [("classifier.0", ("fc6",), "fc_as_conv7"),
           ("classifier.3", ("fc7",), "fc_as_conv1")]
  return engine.Conversion(model, rows, state)


def fpn_rows(torch_prefix: str, flax_path: Tuple[str, ...],
             num_levels: int) -> List[engine.Row]:
  """Rows for torchvision's FeaturePyramidNetwork (no norm layer).

  inner_blocks.{i} / layer_blocks.{i} are Conv2dNormActivation Sequentials
  whose conv is ".0" -> detection.fpn's inner_blocks_{i} / layer_blocks_{i}.
  """
  rows = []
  for block in ("inner_blocks", "layer_blocks"):
    for i in range(num_levels):
      rows.append((engine.join(torch_prefix, f"{block}.{i}.0"),
                   flax_path + (f"{block}_{i}",), "conv"))
  return rows


def fasterrcnn_rows(stage_sizes: Sequence[int]) -> List[engine.Row]:
  """Rows for torchvision's FasterRCNN with a ResNet-FPN backbone.

  Into detection.networks.MaskRCNNNetworks(layout="fpn", masks=False).
  fc6's weight [1024, C*7*7] flattens an NCHW ROI (C, H, W); kind
  "fc_as_conv7" reshapes it to the [7, 7, C, 1024] kernel BoxHead's fc6
  contracts over NHWC (H, W, C).
  """
  rows = resnet_rows("backbone.body", ("backbone", "body"), stage_sizes)
  rows += fpn_rows("backbone.fpn", ("backbone", "fpn"), 4)
  rows += [("rpn.head.conv.0.0", ("rpn_head", "conv"), "conv"),
           ("rpn.head.cls_logits", ("rpn_head", "cls_logits"), "conv"),
           ("rpn.head.bbox_pred", ("rpn_head", "bbox_pred"), "conv"),
           ("roi_heads.box_head.fc6", ("box_head", "fc6"), "fc_as_conv7"),
           ("roi_heads.box_head.fc7", ("box_head", "fc7"), "linear"),
           ("roi_heads.box_predictor.cls_score",
            ("box_head", "predictor", "cls_score"), "linear"),
           ("roi_heads.box_predictor.bbox_pred",
            ("box_head", "predictor", "bbox_pred"), "linear")]
  return rows


def maskrcnn_rows(stage_sizes: Sequence[int],
                  mask_layers: int = 4) -> List[engine.Row]:
  """Rows for torchvision's MaskRCNN with a ResNet-FPN backbone: its
  FasterRCNN's (`fasterrcnn_rows`) and the mask branch's.

  Into detection.networks.MaskRCNNNetworks(layout="fpn"). conv5_mask (a
  ConvTranspose2d) takes kind "conv": heads.ConvTranspose2x2 keeps its
  kernel in that layout.
  """
  rows = fasterrcnn_rows(stage_sizes)
  rows += [(f"roi_heads.mask_head.{i}.0", ("mask_head", f"mask_fcn{i + 1}"),
            "conv") for i in range(mask_layers)]
  rows += [("roi_heads.mask_predictor.conv5_mask",
            ("mask_head", "predictor", "conv5_mask"), "conv"),
           ("roi_heads.mask_predictor.mask_fcn_logits",
            ("mask_head", "predictor", "mask_fcn_logits"), "conv")]
  return rows


# Key names of torchvision < 0.13 (and of its released COCO checkpoint
# files, read with torch.load), which its modules still rename on load
# (the _load_from_state_dict hooks of FPN, RPNHead and MaskRCNNHeads).
_LEGACY_DETECTION_KEYS = (
    (re.compile(
        r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$"),
     lambda m: f"{m[1]}.0.{m[2]}"),
    (re.compile(r"^rpn\.head\.conv\.(weight|bias)$"),
     lambda m: f"rpn.head.conv.0.0.{m[1]}"),
    (re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$"),
     lambda m: f"roi_heads.mask_head.{int(m[1]) - 1}.0.{m[2]}"),
)


def _rename_legacy(state):
  out = {}
  for key, value in state.items():
    for pattern, new in _LEGACY_DETECTION_KEYS:
      match = pattern.match(key)
      if match:
        key = new(match)
        break
    out[key] = value
  return out


def _rcnn_resnet50_fpn(masks: bool):
  """The converter of torchvision's maskrcnn_resnet50_fpn (masks) or
  fasterrcnn_resnet50_fpn (not): the same rows, less the mask branch's."""
  def mapping(state, num_classes=None, frozen_bn_eps=None, **kwargs):
    """torchvision {mask,faster}rcnn_resnet50_fpn -> MaskRCNNNetworks(layout="fpn").

    Args:
      state: its state_dict() (FrozenBatchNorm2d or BatchNorm2d backbone),
        or a legacy-named checkpoint file's contents.
      num_classes: background included; default: the checkpoint's (91 for
        COCO), or torchvision's default 91 for an empty state.
      frozen_bn_eps: the epsilon the checkpoint's FrozenBatchNorm2d layers
        ran with, when not segjax's 1e-5: torchvision's COCO_V1 weights set
        it to 0 (`overwrite_eps(model, 0.0)`), so pass 0.0 for them. Folded
        into the running variances (var + eps - 1e-5), which is exact up to
        float32 rounding.
      **kwargs: other MaskRCNNNetworks options (e.g. dtype); `masks` is
        the converter's.
    """
    state = _rename_legacy(state)
    head_key = "roi_heads.box_predictor.cls_score.weight"
    if num_classes is None:
      num_classes = int(state[head_key].shape[0]) if head_key in state else 91
    if frozen_bn_eps is not None and frozen_bn_eps != layers.BN_EPSILON:
      shift = frozen_bn_eps - layers.BN_EPSILON
      state = {k: (v + shift if k.startswith("backbone.body.")
                   and k.endswith(".running_var") else v)
               for k, v in state.items()}
    model = detection_networks.MaskRCNNNetworks(
        num_classes=num_classes, layout="fpn", masks=masks, **kwargs)
    hints = engine.classes_hint(state, head_key, num_classes)
    if not masks and any(k.startswith("roi_heads.mask_") for k in state):
      hints.append("the checkpoint has a mask branch (roi_heads.mask_*): "
                   "convert it as maskrcnn_resnet50_fpn.")
    rows = (maskrcnn_rows if masks else fasterrcnn_rows)(model.stage_sizes)
    return engine.Conversion(model, rows, state, hints)
  return mapping


TORCHVISION: Dict[str, Callable[..., engine.Conversion]] = {
    "fcn_resnet50": _fcn_resnet,
    "deeplab_v3_resnet50": _deeplab_v3_resnet,
    "fcn_resnet101": _resnet101(_fcn_resnet),
    "deeplab_v3_resnet101": _resnet101(_deeplab_v3_resnet),
    "resnet50": _resnet((3, 4, 6, 3)),
    "resnet101": _resnet((3, 4, 23, 3)),
    "vgg16": _vgg(False),
    "vgg16_bn": _vgg(True),
    "vgg16_fc": _vgg16_fc,
    "fasterrcnn_resnet50_fpn": _rcnn_resnet50_fpn(masks=False),
    "maskrcnn_resnet50_fpn": _rcnn_resnet50_fpn(masks=True),
}


