"""ResNet-50/101 (He et al., CVPR 2016) as a multi-scale feature extractor.

torchvision's v1.5 layout: Bottleneck blocks with the stride in the 3x3 conv
(not the first 1x1 as in the paper's v1), a 7x7/2 stem conv and a 3x3/2 max
pool. Param names follow torchvision's (`conv1`, `bn1`, `layer{s}_{b}` for
`layer{s}.{b}`, `downsample_conv`/`downsample_bn` for `downsample.0/1`), so
segjax.convert maps its state dicts one to one.

Dense prediction keeps resolution by trading strides for dilation: with
`output_stride` 16 the last stage, with 8 the last two, keep stride 1 and
dilate their 3x3 convs instead, exactly as torchvision's
`replace_stride_with_dilation` does: a dilated stage's rate is the previous
rate times 2, and its *first* block still uses the previous stage's rate
(at OS 8: layer3 rates 1, 2, 2, ...; layer4 rates 2, 4, 4). DeepLab v3's
multi-grid instead gives the last stage's blocks the rates
`stage_rate * multi_grid[b]` (at OS 16 with (1, 2, 4): 2, 4, 8), its first
block included, as in the DeepLab reference implementation.

Convs pad explicitly (dilation pixels, 3 for the stem), as PyTorch does:
"SAME" padding would shift stride-2 windows by one pixel on even sizes.
"""
import functools
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.errors import ConfigError
from segjax.models.layers import BN_EPSILON, BN_MOMENTUM
from segjax.models.remat import maybe_remat

Array = jax.Array
Dtype = Any

EXPANSION = 4  # Bottleneck output channels = 4 * planes
FEATURES = ("stem", "c2", "c3", "c4", "c5")
# Which of layer2..layer4 trade their stride for dilation, per output stride
# (torchvision's replace_stride_with_dilation).
_DILATE = {32: (False, False, False), 16: (False, False, True),
           8: (False, True, True)}

# torchvision's conv init: kaiming normal with fan_out (BN: scale 1, bias 0).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def block_schedule(stage_sizes: Sequence[int], output_stride: int = 32,
                   multi_grid: Optional[Sequence[int]] = None
                   ) -> Tuple[Tuple[Tuple[int, int], ...], ...]:
  """(stride, dilation) of every Bottleneck's 3x3 conv, per stage.

  Args:
    stage_sizes: blocks per stage, e.g. (3, 4, 6, 3).
    output_stride: 32, 16 or 8.
    multi_grid: unit rates of the last stage's blocks, or None.

  Returns:
    A tuple per stage of (stride, dilation) per block. Example, ResNet-50 at
    OS 8: layer3 ((1, 1), (1, 2), ..., (1, 2)), layer4 ((1, 2), (1, 4),
    (1, 4)).

  Raises:
    ConfigError: for another output stride or a multi-grid whose length is
      not the last stage's block count.
  """
  if output_stride not in _DILATE:
    raise ConfigError(f"resnet: output_stride must be 8, 16 or 32, got "
                      f"{output_stride}.")
  if multi_grid is not None and len(multi_grid) != stage_sizes[-1]:
    raise ConfigError(
        f"resnet: multi_grid needs one rate per block of the last stage "
        f"({stage_sizes[-1]}), got {tuple(multi_grid)}.")
  dilate = (False,) + _DILATE[output_stride]
  dilation = 1
  schedule = []
  for stage, size in enumerate(stage_sizes):
    stride = 1 if stage == 0 else 2
    previous = dilation
    if dilate[stage]:
      dilation *= stride
      stride = 1
    rates = [previous] + [dilation] * (size - 1)
    if multi_grid is not None and stage == len(stage_sizes) - 1:
      rates = [dilation * m for m in multi_grid]
    schedule.append(tuple((stride if b == 0 else 1, rate)
                          for b, rate in enumerate(rates)))
  return tuple(schedule)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided, dilated) -> 1x1 (4 * planes) with a shortcut.

  Attributes:
    planes: width of the inner convs; the output has 4 * planes channels.
    strides: stride of the 3x3 conv and of the projection shortcut.
    dilation: atrous rate of the 3x3 conv.
    downsample: use a projection shortcut (1x1 conv + BN), as the first block
      of every stage does.
    norm: BatchNorm constructor (use_running_average already bound).
    dtype: compute dtype.
  """
  planes: int
  strides: int = 1
  dilation: int = 1
  downsample: bool = False
  norm: Any = nn.BatchNorm
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [N, H, W, C] -> [N, H / strides, W / strides, 4 * planes]."""
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             kernel_init=_conv_init)
    d = self.dilation
    y = conv(self.planes, (1, 1), name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = conv(self.planes, (3, 3), strides=(self.strides, self.strides),
             padding=((d, d), (d, d)), kernel_dilation=(d, d),
             name="conv2")(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = conv(self.planes * EXPANSION, (1, 1), name="conv3")(y)
    y = self.norm(name="bn3")(y)
    if self.downsample:
      x = conv(self.planes * EXPANSION, (1, 1),
               strides=(self.strides, self.strides),
               name="downsample_conv")(x)
      x = self.norm(name="downsample_bn")(x)
    return nn.relu(y + x)


class ResNet(nn.Module):
  """Bottleneck ResNet returning the stem and C2..C5 feature maps.

  Attributes:
    stage_sizes: Bottleneck blocks per stage: (3, 4, 6, 3) is ResNet-50,
      (3, 4, 23, 3) ResNet-101.
    width: stem channels and layer1's planes (64); stage s has width * 2**s
      planes. Smaller values only make tests fast.
    output_stride: 32, 16 or 8; see the module docstring.
    multi_grid: DeepLab v3 unit rates for the last stage, e.g. (1, 2, 4), or
      None for torchvision's rates.
    frozen_bn: BatchNorm always uses its running statistics, also with
      train=True, and never updates them (torchvision's FrozenBatchNorm2d, for
      small per-device batches as in detection). Its scale and bias are still
      in "params"; mask them in the optimiser to freeze them too.
    dtype: compute dtype; params and BN statistics stay float32.
    bn_axis_name: pmap axis name for synchronised BatchNorm statistics.
    remat: recompute each Bottleneck's activations in the backward pass
      instead of storing them (segjax.models.remat).
  """
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  output_stride: int = 32
  multi_grid: Optional[Sequence[int]] = None
  frozen_bn: bool = False
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None
  remat: bool = False

  def __post_init__(self):
    if len(self.stage_sizes) != 4 or min(self.stage_sizes) < 1:
      raise ConfigError(f"resnet: stage_sizes must be 4 positive ints, got "
                        f"{tuple(self.stage_sizes)}.")
    if self.width < 1:
      raise ConfigError(f"resnet: width must be >= 1, got {self.width}.")
    block_schedule(self.stage_sizes, self.output_stride, self.multi_grid)
    super().__post_init__()

  @property
  def channels(self) -> Dict[str, int]:
    """Channels of each returned feature map."""
    c = {"stem": self.width}
    for s in range(4):
      c[f"c{s + 2}"] = self.width * 2**s * EXPANSION
    return c

  @property
  def strides(self) -> Dict[str, int]:
    """Stride (input pixels per feature pixel) of each returned feature map."""
    return {"stem": 2, "c2": 4, "c3": 8,
            "c4": min(16, self.output_stride), "c5": self.output_stride}

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> Dict[str, Array]:
    """Computes the feature pyramid.

    Args:
      images: [N, H, W, 3] float, normalised.
      train: use batch statistics (and update batch_stats) in BatchNorm,
        unless frozen_bn.

    Returns:
      {"stem": [N, H/2, W/2, width] (after conv1, bn1, ReLU, before the max
      pool), "c2": [N, H/4, W/4, 4 * width], "c3": [.., H/8, .., 8 * width],
      "c4": [.., H/min(16, OS), .., 16 * width], "c5": [.., H/OS, ..,
      32 * width]} in `dtype`, sizes rounded up as PyTorch's do
      (floor((H - 1) / 2) + 1 per stride-2 layer).
    """
    norm = functools.partial(
        nn.BatchNorm, use_running_average=self.frozen_bn or not train,
        momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=self.dtype,
        axis_name=self.bn_axis_name)
    x = images.astype(self.dtype)
    x = nn.Conv(self.width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
                use_bias=False, dtype=self.dtype, kernel_init=_conv_init,
                name="conv1")(x)
    x = nn.relu(norm(name="bn1")(x))
    outputs = {"stem": x}
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    schedule = block_schedule(self.stage_sizes, self.output_stride,
                              self.multi_grid)
    block = maybe_remat(Bottleneck, self.remat)
    for s, blocks in enumerate(schedule):
      for b, (stride, dilation) in enumerate(blocks):
        x = block(self.width * 2**s, stride, dilation, downsample=b == 0,
                       norm=norm, dtype=self.dtype,
                       name=f"layer{s + 1}_{b}")(x)
      outputs[f"c{s + 2}"] = x
    return outputs


ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3))
