"""torchvision's FCN-ResNet and DeepLab v3-ResNet, layer for layer.

These are `torchvision.models.segmentation.fcn_resnet50` and
`deeplabv3_resnet50`, not the papers' original networks (the VGG FCN-32s/16s/8s
and the DeepLab v1/v2 models live in fcn.py and deeplab.py): a ResNet-50 at
output stride 8 (layer3 and layer4 dilated), one head on C5, an optional
auxiliary FCN head on C4, and both sets of logits bilinearly upsampled
(align_corners=False) to the input size. Module names mirror torchvision's
so segjax.convert.from_torch maps its state dicts (e.g. the COCO-VOC weights)
one to one:

  FCN:        backbone, classifier (FCNHead), aux_classifier (FCNHead)
  DeepLab v3: backbone, classifier (ASPP + 3x3 conv + 1x1 conv), aux_classifier

FCNHead:  3x3 conv C -> C/4 (no bias), BN, ReLU, Dropout(0.1), 1x1 conv -> K.
ASPP:     1x1 conv, three 3x3 atrous convs (rates 12, 24, 36) and an image
          pooling branch (global mean, 1x1 conv, broadcast back), each to 256
          channels + BN + ReLU; concatenated, projected by a 1x1 conv to 256
          + BN + ReLU + Dropout(0.5).

Registered in segjax.models as "fcn_resnet50" and "deeplab_v3_resnet50".
"""
import functools
from typing import Any, Dict, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.errors import ConfigError
from segjax.models.backbones.resnet import ResNet
from segjax.models.layers import ConvBNAct
from segjax.ops.resize import resize

Array = jax.Array
Dtype = Any


class FCNHead(nn.Module):
  """torchvision's FCNHead: 3x3 conv to C_in / 4 + BN + ReLU, dropout, 1x1.

  Attributes:
    num_classes: output channels K.
    inter_channels: channels of the 3x3 conv (torchvision: C_in // 4).
    dropout: dropout rate before the classifier (0.1).
    dtype: compute dtype.
    bn_axis_name: pmap axis name for BatchNorm statistics.
  """
  num_classes: int
  inter_channels: int
  dropout: float = 0.1
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """x: [N, h, w, C_in] -> logits [N, h, w, K] in `dtype`."""
    x = ConvBNAct(self.inter_channels, (3, 3), dtype=self.dtype,
                  bn_axis_name=self.bn_axis_name, name="block")(x, train)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype,
                   name="head")(x)


class ASPP(nn.Module):
  """torchvision's ASPP (DeepLab v3): parallel atrous branches + projection.

  Attributes:
    rates: atrous rates of the three 3x3 branches.
    channels: output channels of every branch and of the projection (256).
    dropout: dropout rate after the projection (0.5).
    dtype: compute dtype.
    bn_axis_name: pmap axis name for BatchNorm statistics.
  """
  rates: Sequence[int] = (12, 24, 36)
  channels: int = 256
  dropout: float = 0.5
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """x: [N, h, w, C_in] -> [N, h, w, channels] in `dtype`."""
    block = lambda kernel, name, dilation=1: ConvBNAct(
        self.channels, kernel, kernel_dilation=(dilation, dilation),
        dtype=self.dtype, bn_axis_name=self.bn_axis_name, name=name)
    # Branch names follow torchvision's ModuleList `convs` indices.
    branches = [block((1, 1), "convs_0")(x, train)]
    for i, rate in enumerate(self.rates, 1):
      # "SAME" pads a stride-1 dilated 3x3 conv by `rate` on every side:
      # PyTorch's padding=rate.
      branches.append(block((3, 3), f"convs_{i}", rate)(x, train))
    pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
    pooled = block((1, 1), f"convs_{len(self.rates) + 1}")(pooled, train)
    # Bilinear upsampling of a 1x1 map (torchvision's F.interpolate) is a
    # broadcast.
    branches.append(jnp.broadcast_to(pooled, branches[0].shape))
    x = jnp.concatenate(branches, axis=-1)
    x = block((1, 1), "project")(x, train)
    return nn.Dropout(self.dropout, deterministic=not train)(x)


class DeepLabHead(nn.Module):
  """torchvision's DeepLabHead: ASPP, 3x3 conv 256 + BN + ReLU, 1x1 to K.

  Attributes:
    num_classes: output channels K.
    rates: ASPP atrous rates.
    dtype: compute dtype.
    bn_axis_name: pmap axis name for BatchNorm statistics.
  """
  num_classes: int
  rates: Sequence[int] = (12, 24, 36)
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """x: [N, h, w, C_in] -> logits [N, h, w, K] in `dtype`."""
    x = ASPP(self.rates, dtype=self.dtype, bn_axis_name=self.bn_axis_name,
             name="aspp")(x, train)
    x = ConvBNAct(256, (3, 3), dtype=self.dtype,
                  bn_axis_name=self.bn_axis_name, name="block")(x, train)
    return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype,
                   name="head")(x)


def upsample_logits(logits: Array, size: Sequence[int]) -> Array:
  """[N, h, w, K] -> [N, H, W, K] float32, bilinear (align_corners=False).

  In float32, like the logits the losses see.
  """
  return resize(logits.astype(jnp.float32), size)


def aux_logits(c4: Array, size: Sequence[int], num_classes: int, train: bool,
               dtype: Dtype, bn_axis_name: Optional[str]) -> Array:
  """torchvision's auxiliary FCNHead ("aux_classifier") on C4, upsampled.

  Call from a compact module: the head becomes its submodule.
  """
  head = FCNHead(num_classes, c4.shape[-1] // 4, dtype=dtype,
                 bn_axis_name=bn_axis_name, name="aux_classifier")
  return upsample_logits(head(c4, train), size)


class _TorchvisionSegModel(nn.Module):
  """ResNet backbone + main head on C5 (+ FCN aux head on C4), upsampled.

  Attributes:
    num_classes: number of output classes K.
    aux: add the auxiliary FCNHead on C4 (torchvision's aux_loss=True); its
      upsampled logits are returned as outputs["aux"][0].
    stage_sizes: ResNet blocks per stage ((3, 4, 6, 3): ResNet-50;
      (3, 4, 23, 3): ResNet-101).
    width: ResNet base width (64); smaller values only make tests fast.
    output_stride: backbone output stride (torchvision: 8).
    dtype: compute dtype (bfloat16 on accelerators); params are float32 and
      the logits are returned in float32.
    bn_axis_name: pmap axis name for synchronised BatchNorm statistics.
    remat: recompute the backbone's blocks in the backward pass instead of
      storing their activations (segjax.models.remat).
  """
  num_classes: int
  aux: bool = False
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  output_stride: int = 8
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None
  remat: bool = False

  def __post_init__(self):
    if self.num_classes < 1:
      raise ConfigError(f"{type(self).__name__}: num_classes must be >= 1, "
                        f"got {self.num_classes}.")
    super().__post_init__()

  def _backbone(self) -> ResNet:
    return ResNet(self.stage_sizes, self.width, self.output_stride,
                  dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                  remat=self.remat, name="backbone")

  def _classifier(self, in_channels: int) -> nn.Module:
    """The main head on C5 (C5 has `in_channels`): each subclass's own."""
    raise NotImplementedError(f"{type(self).__name__} must define its head")

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> Dict[str, Any]:
    """Segments a batch of images.

    Args:
      images: [N, H, W, 3] float, normalised; any H, W >= 1.
      train: use batch statistics (and update batch_stats) and dropout (needs
        a "dropout" rng).

    Returns:
      {"logits": [N, H, W, K] float32} plus, with aux, {"aux": [[N, H, W, K]
      float32]}.
    """
    if images.ndim != 4:
      raise ValueError(f"images must be [N, H, W, C], got {images.shape}")
    size = images.shape[1:3]
    backbone = self._backbone()
    features = backbone(images, train)
    logits = self._classifier(backbone.channels["c5"])(features["c5"], train)
    outputs = {"logits": upsample_logits(logits, size)}
    if self.aux:
      outputs["aux"] = [aux_logits(features["c4"], size, self.num_classes, train,
                                   self.dtype, self.bn_axis_name)]
    return outputs


class FCNResNet(_TorchvisionSegModel):
  """torchvision's fcn_resnet50 (see _TorchvisionSegModel for attributes)."""

  def _classifier(self, in_channels: int) -> nn.Module:
    return FCNHead(self.num_classes, in_channels // 4, dtype=self.dtype,
                   bn_axis_name=self.bn_axis_name, name="classifier")


class DeepLabV3ResNet(_TorchvisionSegModel):
  """torchvision's deeplabv3_resnet50 (see _TorchvisionSegModel; rates are
  the ASPP atrous rates, (12, 24, 36) as torchvision's at output stride 8)."""
  rates: Sequence[int] = (12, 24, 36)

  def _classifier(self, in_channels: int) -> nn.Module:
    del in_channels  # the ASPP's convs take any input width
    return DeepLabHead(self.num_classes, self.rates, dtype=self.dtype,
                       bn_axis_name=self.bn_axis_name, name="classifier")


# torchvision's ResNet-101 variants: the same modules with (3, 4, 23, 3) blocks.
RESNET101_STAGES = (3, 4, 23, 3)
FCNResNet101 = functools.partial(FCNResNet, stage_sizes=RESNET101_STAGES)
DeepLabV3ResNet101 = functools.partial(DeepLabV3ResNet, stage_sizes=RESNET101_STAGES)
