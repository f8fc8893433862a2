"""The C4 variant of Mask R-CNN: one stride-16 feature map, res5 as ROI head.

He et al. 2017's "ResNet-C4" network (Faster R-CNN's original ResNet
design): the backbone stops after conv4 (C4, stride 16, 1024 channels); the
RPN runs on C4 alone; ROIs are pooled 14x14 from C4 and go through the
ResNet's conv5 stage (stride 2 -> 7x7x2048), which is shared by both heads:

  box:   res5 -> global average pool -> cls_score / bbox_pred (BoxPredictor)
  mask:  res5 -> 2x2/2 transposed conv (256) + ReLU -> 1x1 per-class logits
         (MaskPredictor), 14x14 masks

Both modules reuse backbones.resnet's Bottleneck and block schedule and its
param names (conv1, bn1, layer{s}_{b}; res5 blocks are layer4_{b}), so a
torchvision ImageNet ResNet initialises them with segjax.convert's
`resnet_rows`: layers 1-3 into ResNetC4, layer4 into Res5Head. Blocks are
torchvision's v1.5 (stride in the 3x3 conv); the MSRA weights Detectron's
C4 models started from put it in the first 1x1 conv.
"""
import functools
from typing import Any, Dict, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models.backbones import resnet as resnet_lib
from segjax.models.layers import BN_EPSILON, BN_MOMENTUM
from segjax.models.remat import maybe_remat

Array = jax.Array
Dtype = Any

# torchvision's conv init (kaiming normal, fan_out), as backbones.resnet.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _norm(frozen_bn, train, dtype, axis_name):
  return functools.partial(
      nn.BatchNorm, use_running_average=frozen_bn or not train,
      momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype,
      axis_name=axis_name)


class ResNetC4(nn.Module):
  """ResNet stem and stages 1-3: the C4 backbone.

  Attributes:
    stage_sizes: blocks per stage, as for backbones.resnet.ResNet; the last
      entry is Res5Head's block count and unused here.
    width: stem channels (64); smaller only to make tests fast.
    frozen_bn: BatchNorm with fixed statistics (FrozenBatchNorm2d).
    dtype: compute dtype; params and BN statistics stay float32.
    bn_axis_name: pmap axis for synchronised BN (only without frozen_bn).
    remat: recompute each Bottleneck's activations in the backward pass
      instead of storing them (segjax.models.remat).
  """
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  frozen_bn: bool = True
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None
  remat: bool = False

  @property
  def strides(self) -> Dict[str, int]:
    return {"c4": 16}

  @property
  def channels(self) -> Dict[str, int]:
    return {"c4": self.width * 4 * resnet_lib.EXPANSION}

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> Dict[str, Array]:
    """images: [N, H, W, 3] normalised -> {"c4": [N, ~H/16, ~W/16, 16 * width]}.

    Sizes round up as PyTorch's do (floor((S - 1) / 2) + 1 per stride 2).
    """
    norm = _norm(self.frozen_bn, train, self.dtype, self.bn_axis_name)
    # The stem of resnet.ResNet, same names and padding.
    x = nn.Conv(self.width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
                use_bias=False, dtype=self.dtype, kernel_init=_conv_init,
                name="conv1")(images.astype(self.dtype))
    x = nn.relu(norm(name="bn1")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    schedule = resnet_lib.block_schedule(self.stage_sizes)
    bottleneck = maybe_remat(resnet_lib.Bottleneck, self.remat)
    for s, blocks in enumerate(schedule[:3]):
      for b, (stride, dilation) in enumerate(blocks):
        x = bottleneck(self.width * 2**s, stride, dilation, downsample=b == 0,
                       norm=norm, dtype=self.dtype, name=f"layer{s + 1}_{b}")(x)
    return {"c4": x}


class Res5Head(nn.Module):
  """ResNet stage 5 applied to pooled ROIs: the C4 variant's shared ROI head.

  Attributes:
    num_blocks: Bottleneck blocks (3 for ResNet-50 and -101).
    width: the backbone's stem width (64): the blocks have 8 * width planes
      and output 32 * width channels.
    frozen_bn: BatchNorm with fixed statistics, as in the backbone.
    dtype: compute dtype; params and BN statistics stay float32.
    bn_axis_name: pmap axis for synchronised BN (only without frozen_bn).
    remat: recompute each Bottleneck's activations in the backward pass
      instead of storing them (segjax.models.remat).
  """
  num_blocks: int = 3
  width: int = 64
  frozen_bn: bool = True
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None
  remat: bool = False

  @nn.compact
  def __call__(self, pooled: Array, train: bool = False) -> Array:
    """pooled: [R, P, P, 16 * width] -> [R, ceil(P/2), ceil(P/2), 32 * width].

    P is 14 in the paper, so the output is 7x7.
    """
    norm = _norm(self.frozen_bn, train, self.dtype, self.bn_axis_name)
    x = pooled.astype(self.dtype)
    bottleneck = maybe_remat(resnet_lib.Bottleneck, self.remat)
    for b in range(self.num_blocks):
      x = bottleneck(self.width * 8, 2 if b == 0 else 1, 1, downsample=b == 0,
                     norm=norm, dtype=self.dtype, name=f"layer4_{b}")(x)
    return x
