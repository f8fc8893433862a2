"""Feature Pyramid Network (Lin et al., CVPR 2017) over the ResNet backbone.

Laid out like torchvision's `FeaturePyramidNetwork` with `LastLevelMaxPool`
and its `BackboneWithFPN` (torchvision.ops.feature_pyramid_network,
torchvision.models.detection.backbone_utils), so `maskrcnn_resnet50_fpn`
checkpoints convert one to one:

  C2..C5 --1x1 lateral (inner_blocks_i)--> L_i
  M5 = L5;  M_i = L_i + nearest_resize(M_{i+1}, size of L_i)
  P_i = 3x3 conv (layer_blocks_i) of M_i          (all 256 channels)
  P6 = P5[:, ::2, ::2]                            (max pool, kernel 1, stride 2)

The top-down path resizes to the lateral's size, not by a factor of 2, as
torchvision's F.interpolate(size=...) does: for inputs that are not a
multiple of 32 (C5 3x4 under C4 6x7, say) the two differ, and the checkpoint
was trained with the former.
"""
import functools
from typing import Any, Dict, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models.backbones import resnet as resnet_lib
from segjax.ops.resize import resize

Array = jax.Array
Dtype = Any

# torchvision's FPN init: kaiming_uniform_(a=1), i.e. U(+-sqrt(3 / fan_in)),
# and zero biases.
_fpn_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
LEVELS = ("p2", "p3", "p4", "p5", "p6")


class FeaturePyramidNetwork(nn.Module):
  """Lateral 1x1 convs, a nearest-neighbour top-down path and 3x3 outputs.

  Attributes:
    out_channels: channels of every output level (256).
    extra_max_pool: append P6 = the coarsest output subsampled by 2
      (torchvision's LastLevelMaxPool; Mask R-CNN's RPN uses it, its ROI
      heads do not).
    dtype: compute dtype; params stay float32.
  """
  out_channels: int = 256
  extra_max_pool: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[Array]) -> list:
    """Builds the pyramid.

    Args:
      features: L maps [N, H_i, W_i, C_i], finest first (C2..C5), each about
        half the size of the previous one.

    Returns:
      L (+ 1 with extra_max_pool) maps [N, H_i, W_i, out_channels] in
      `dtype`, finest first; the extra level is [N, ceil(H_L / 2),
      ceil(W_L / 2), out_channels].
    """
    conv = functools.partial(nn.Conv, self.out_channels, dtype=self.dtype,
                             kernel_init=_fpn_init)
    last = len(features) - 1
    top = conv((1, 1), name=f"inner_blocks_{last}")(
        features[last].astype(self.dtype))
    outputs = [conv((3, 3), padding=((1, 1), (1, 1)),
                    name=f"layer_blocks_{last}")(top)]
    for i in range(last - 1, -1, -1):
      lateral = conv((1, 1), name=f"inner_blocks_{i}")(
          features[i].astype(self.dtype))
      top = lateral + resize(top, lateral.shape[1:3], "nearest")
      outputs.insert(0, conv((3, 3), padding=((1, 1), (1, 1)),
                             name=f"layer_blocks_{i}")(top))
    if self.extra_max_pool:
      # A 1x1 max pool with stride 2 is plain subsampling.
      outputs.append(outputs[-1][:, ::2, ::2])
    return outputs


class ResNetFPN(nn.Module):
  """ResNet + FPN: torchvision's `resnet_fpn_backbone` (BackboneWithFPN).

  Params: "body" (backbones.resnet.ResNet, torchvision's names) and "fpn"
  (FeaturePyramidNetwork), as torchvision's `backbone.body` / `backbone.fpn`.

  Attributes:
    stage_sizes: Bottleneck blocks per stage; (3, 4, 6, 3) is ResNet-50.
    width: ResNet stem width (64); smaller only to make tests fast.
    out_channels: FPN channels (256).
    frozen_bn: BatchNorm with fixed statistics, torchvision's
      FrozenBatchNorm2d, the detection default (per-device batches of 1-2
      images give useless batch statistics).
    dtype: compute dtype; params and BN statistics stay float32.
    bn_axis_name: pmap axis for synchronised BN (only without frozen_bn).
    remat: recompute each Bottleneck's activations in the backward pass
      instead of storing them (segjax.models.remat).
  """
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  out_channels: int = 256
  frozen_bn: bool = True
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None
  remat: bool = False

  @property
  def strides(self) -> Dict[str, int]:
    """Input pixels per feature pixel of each returned level."""
    return {name: 2 ** (i + 2) for i, name in enumerate(LEVELS)}

  @property
  def channels(self) -> Dict[str, int]:
    return {name: self.out_channels for name in LEVELS}

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> Dict[str, Array]:
    """Multi-scale features.

    Args:
      images: [N, H, W, 3] float, normalised (ImageNet mean / std).
      train: BatchNorm mode when not frozen_bn.

    Returns:
      {"p2": [N, ceil(H/4), ceil(W/4), out_channels], "p3" (/8), "p4"
      (/16), "p5" (/32), "p6" (/64)} in `dtype` (sizes as PyTorch rounds
      them: each stride-2 layer maps S to floor((S - 1) / 2) + 1).
    """
    body = resnet_lib.ResNet(stage_sizes=self.stage_sizes, width=self.width,
                             frozen_bn=self.frozen_bn, dtype=self.dtype,
                             bn_axis_name=self.bn_axis_name, remat=self.remat,
                             name="body")
    c = body(images, train=train)
    pyramid = FeaturePyramidNetwork(self.out_channels, extra_max_pool=True,
                                    dtype=self.dtype, name="fpn")(
        [c["c2"], c["c3"], c["c4"], c["c5"]])
    return dict(zip(LEVELS, pyramid))
