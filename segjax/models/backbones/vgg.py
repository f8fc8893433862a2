"""VGG (Simonyan and Zisserman, ICLR 2015) as a multi-scale feature extractor.

Five stages of 3x3 convs (+ BatchNorm in the "_bn" variants) + ReLU, each
ended by 2x2 max pooling; the stage outputs pool1..pool5 sit at strides
2, 4, 8, 16 and 32. Only the convolutional part (torchvision's `features`) is
here: the classifier's fully connected layers are a detail of the models
built on top (FCN turns them into convolutions).

Param names are `conv{stage}_{i}` (and `bn{stage}_{i}`), the Caffe names the
FCN and DeepLab papers use; segjax.convert maps torchvision's
`vgg16().features` / `vgg16_bn().features` indices onto them one to one.
Unlike ResNet's, torchvision's VGG convs keep their bias even before a
BatchNorm, so they do here too.

FCN's Caffe models pad the first conv by 100 pixels and pool in ceil mode, so
that any input size survives five poolings and the score maps can be cropped
back onto the image: `first_padding=100, ceil_mode=True`.
"""
import functools
from typing import Any, Dict, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.errors import ConfigError
from segjax.models.layers import BN_EPSILON, BN_MOMENTUM

Array = jax.Array
Dtype = Any

WIDTHS = (64, 128, 256, 512, 512)


class VGG(nn.Module):
  """VGG conv stages returning the five pooled feature maps.

  Attributes:
    stage_sizes: convs per stage: (2, 2, 3, 3, 3) is VGG-16, (2, 2, 4, 4, 4)
      VGG-19, (1, 1, 2, 2, 2) VGG-11.
    batch_norm: BatchNorm after every conv (torchvision's vgg16_bn).
    ceil_mode: pool in ceil mode (PyTorch's MaxPool2d(2, 2, ceil_mode=True),
      Caffe's pooling): a trailing odd row/column gets its own window instead
      of being dropped, so an H-pixel input gives ceil(H / 2).
    first_padding: zero padding of the first conv (1 keeps the size; FCN
      uses 100).
    dtype: compute dtype; params and BN statistics stay float32.
    bn_axis_name: pmap axis name for synchronised BatchNorm statistics.
  """
  stage_sizes: Sequence[int] = (2, 2, 3, 3, 3)
  batch_norm: bool = False
  ceil_mode: bool = False
  first_padding: int = 1
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  def __post_init__(self):
    if len(self.stage_sizes) != 5 or min(self.stage_sizes) < 1:
      raise ConfigError(f"vgg: stage_sizes must be 5 positive ints, got "
                        f"{tuple(self.stage_sizes)}.")
    if self.first_padding < 0:
      raise ConfigError(f"vgg: first_padding must be >= 0, got "
                        f"{self.first_padding}.")
    super().__post_init__()

  @property
  def channels(self) -> Dict[str, int]:
    """Channels of each returned feature map."""
    return {f"pool{s + 1}": w for s, w in enumerate(WIDTHS)}

  @property
  def strides(self) -> Dict[str, int]:
    """Stride (input pixels per feature pixel) of each returned feature map."""
    return {f"pool{s + 1}": 2**(s + 1) for s in range(5)}

  def _pool(self, x: Array) -> Array:
    pads = [(0, 0), (0, 0)]
    if self.ceil_mode:
      # Padding with -inf (max_pool's init value) by one odd row/column gives
      # that row its own window: PyTorch's ceil_mode for a 2x2/2 pool.
      pads = [(0, x.shape[1] % 2), (0, x.shape[2] % 2)]
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding=pads)

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> Dict[str, Array]:
    """Computes the pooled stage outputs.

    Args:
      images: [N, H, W, 3] float, normalised.
      train: use batch statistics (and update batch_stats) in BatchNorm.

    Returns:
      {"pool1": [N, H/2, W/2, 64], ..., "pool5": [N, H/32, W/32, 512]} in
      `dtype` (sizes rounded down, or up with ceil_mode, at every pooling;
      with first_padding p each spatial size first grows by 2 * (p - 1)).
    """
    conv = functools.partial(
        nn.Conv, kernel_size=(3, 3), dtype=self.dtype,
        # torchvision's VGG init: kaiming normal, fan_out, zero bias.
        kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"))
    x = images.astype(self.dtype)
    outputs = {}
    for stage, (size, width) in enumerate(zip(self.stage_sizes, WIDTHS), 1):
      for i in range(1, size + 1):
        pad = self.first_padding if (stage, i) == (1, 1) else 1
        x = conv(width, padding=((pad, pad), (pad, pad)),
                 name=f"conv{stage}_{i}")(x)
        if self.batch_norm:
          x = nn.BatchNorm(use_running_average=not train,
                           momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                           dtype=self.dtype, axis_name=self.bn_axis_name,
                           name=f"bn{stage}_{i}")(x)
        x = nn.relu(x)
      x = self._pool(x)
      outputs[f"pool{stage}"] = x
    return outputs


VGG16 = functools.partial(VGG, stage_sizes=(2, 2, 3, 3, 3))
VGG16BN = functools.partial(VGG, stage_sizes=(2, 2, 3, 3, 3), batch_norm=True)
