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

Options used by the other VGG-based models (the defaults leave VGG as above):
  widths            channels per stage (smaller only to make tests fast)
  pool_window=3     DeepLab's Caffe pooling: 3x3 windows padded by 1
  pool_strides      DeepLab v1 pools stages 4 and 5 with stride 1
  dilations         per-stage atrous rate of the 3x3 convs (DeepLab: conv5 2)
  return_indices    SegNet / DeconvNet: also return the pooling switches
                    ("indices{s}", PyTorch's flat h * W + w) and the
                    pre-pooling maps ("conv{s}", whose sizes max_unpool needs)
"""
import functools
from typing import Any, Dict, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.errors import ConfigError
from segjax.models.layers import BN_EPSILON, BN_MOMENTUM
from segjax.ops.unpool import max_pool_with_argmax

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
    widths: output channels of each stage's convs.
    pool_window: 2 (2x2 windows, no padding) or 3 (3x3 windows padded by 1,
      DeepLab's Caffe pooling; with ceil_mode an H-pixel input gives
      ceil((H - 1) / s) + 1 at stride s, e.g. 321 -> 161).
    pool_strides: stride of each stage's pooling.
    dilations: atrous rate of each stage's 3x3 convs (padded by the rate, so
      the size is kept).
    return_indices: pool with max_pool_with_argmax (2x2 windows, stride 2,
      floor mode only) and also return "indices{s}" and "conv{s}".
  """
  stage_sizes: Sequence[int] = (2, 2, 3, 3, 3)
  batch_norm: bool = False
  ceil_mode: bool = False
  first_padding: int = 1
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None
  widths: Sequence[int] = WIDTHS
  pool_window: int = 2
  pool_strides: Sequence[int] = (2, 2, 2, 2, 2)
  dilations: Sequence[int] = (1, 1, 1, 1, 1)
  return_indices: bool = False

  def __post_init__(self):
    if len(self.stage_sizes) != 5 or min(self.stage_sizes) < 1:
      raise ConfigError(f"vgg: stage_sizes must be 5 positive ints, got "
                        f"{tuple(self.stage_sizes)}.")
    if self.first_padding < 0:
      raise ConfigError(f"vgg: first_padding must be >= 0, got "
                        f"{self.first_padding}.")
    for field in ("widths", "pool_strides", "dilations"):
      value = tuple(getattr(self, field))
      if len(value) != 5 or min(value) < 1:
        raise ConfigError(f"vgg: {field} must be 5 positive ints, got {value}.")
    if self.pool_window not in (2, 3):
      raise ConfigError(f"vgg: pool_window must be 2 or 3, got "
                        f"{self.pool_window}.")
    if self.return_indices and (
        self.pool_window != 2 or self.ceil_mode
        or tuple(self.pool_strides) != (2,) * 5):
      raise ConfigError("vgg: return_indices needs the plain 2x2/2 floor-mode "
                        "pooling (pool_window=2, ceil_mode=False, strides 2).")
    super().__post_init__()

  @property
  def channels(self) -> Dict[str, int]:
    """Channels of each returned feature map."""
    return {f"pool{s + 1}": w for s, w in enumerate(self.widths)}

  @property
  def strides(self) -> Dict[str, int]:
    """Stride (input pixels per feature pixel) of each returned feature map."""
    strides, stride = {}, 1
    for s, pool_stride in enumerate(self.pool_strides):
      stride *= pool_stride
      strides[f"pool{s + 1}"] = stride
    return strides

  def _pool(self, x: Array, stride: int) -> Array:
    k = self.pool_window
    pad = (k - 1) // 2
    pads = []
    for size in x.shape[1:3]:
      span = size + 2 * pad - k
      out = (-(-span // stride) if self.ceil_mode else span // stride) + 1
      if self.ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1  # PyTorch's and Caffe's rule: no window starts in the padding
      # Padding with -inf (max_pool's init value) gives the extra ceil-mode
      # windows the rows that exist; e.g. one odd row for a 2x2/2 pool.
      pads.append((pad, max(0, (out - 1) * stride + k - size - pad)))
    return nn.max_pool(x, (k, k), strides=(stride, stride), padding=pads)

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
      With return_indices also "conv{s}" (the stage's map before pooling)
      and "indices{s}" ([N, h, w, C] int32 argmax switches of "pool{s}").
    """
    conv = functools.partial(
        nn.Conv, kernel_size=(3, 3), dtype=self.dtype,
        # torchvision's VGG init: kaiming normal, fan_out, zero bias.
        kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"))
    x = images.astype(self.dtype)
    outputs = {}
    for stage, (size, width, dilation) in enumerate(
        zip(self.stage_sizes, self.widths, self.dilations), 1):
      for i in range(1, size + 1):
        pad = self.first_padding if (stage, i) == (1, 1) else dilation
        x = conv(width, padding=((pad, pad), (pad, pad)),
                 kernel_dilation=(dilation, dilation),
                 name=f"conv{stage}_{i}")(x)
        if self.batch_norm:
          x = nn.BatchNorm(use_running_average=not train,
                           momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                           dtype=self.dtype, axis_name=self.bn_axis_name,
                           name=f"bn{stage}_{i}")(x)
        x = nn.relu(x)
      if self.return_indices:
        outputs[f"conv{stage}"] = x
        x, outputs[f"indices{stage}"] = max_pool_with_argmax(x, 2, 2)
      else:
        x = self._pool(x, self.pool_strides[stage - 1])
      outputs[f"pool{stage}"] = x
    return outputs


VGG16 = functools.partial(VGG, stage_sizes=(2, 2, 3, 3, 3))
VGG16BN = functools.partial(VGG, stage_sizes=(2, 2, 3, 3, 3), batch_norm=True)
