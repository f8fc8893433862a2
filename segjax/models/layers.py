"""Small building blocks shared by the segmentation models.

  ConvBNAct         conv -> optional BatchNorm -> optional activation
  DoubleConv        two 3x3 ConvBNAct: a U-Net-family node
  ConvTranspose2x   learned 2x upsampling (a 2x2, stride-2 transposed conv),
                    computed as a 1x1 conv to 4*C channels + depth-to-space
  BilinearUp2x      bilinear 2x upsampling (align_corners=False) + 1x1 conv
  depth_to_space    [N, H, W, r*r*C] -> [N, r*H, r*W, C]

All blocks take NHWC inputs, compute in `dtype` and keep float32 params.
"""
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.ops import resize

Array = jax.Array
Dtype = Any

# BatchNorm settings used by every model: PyTorch's defaults (momentum 0.1 in
# PyTorch's convention is 0.9 in Flax's), so converted weights match.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


class ConvBNAct(nn.Module):
  """Conv -> BatchNorm (optional) -> activation (optional).

  Attributes:
    features: output channels.
    kernel_size: conv window, e.g. (3, 3).
    strides: conv strides.
    padding: "SAME", "VALID" or explicit pads, as for nn.Conv.
    kernel_dilation: atrous rate.
    use_norm: add BatchNorm. The conv then has no bias, since BatchNorm's own
      bias replaces it (a conv bias before BN gets no gradient).
    act: activation, or None for a linear block.
    dtype: compute dtype; params stay float32 and BN statistics are float32.
    bn_axis_name: the pmap axis to average BN statistics over (pmap mode);
      None under jit, where statistics are global over the sharded batch.
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Union[str, Sequence[Any]] = "SAME"
  kernel_dilation: Sequence[int] = (1, 1)
  use_norm: bool = True
  act: Optional[Callable[[Array], Array]] = nn.relu
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """x: [N, H, W, C_in] -> [N, H', W', features] in `dtype`."""
    x = nn.Conv(self.features, tuple(self.kernel_size),
                strides=tuple(self.strides), padding=self.padding,
                kernel_dilation=tuple(self.kernel_dilation),
                use_bias=not self.use_norm, dtype=self.dtype,
                kernel_init=nn.initializers.kaiming_normal(), name="conv")(x)
    if self.use_norm:
      x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                       epsilon=BN_EPSILON, dtype=self.dtype,
                       axis_name=self.bn_axis_name, name="bn")(x)
    if self.act is not None:
      x = self.act(x)
    return x


class DoubleConv(nn.Module):
  """Two 3x3 conv (+ BN) + ReLU blocks: one U-Net / UNet++ / UNet 3+ node."""
  features: int
  padding: str
  use_norm: bool
  dtype: Dtype
  bn_axis_name: Optional[str]

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    for i in range(2):
      x = ConvBNAct(self.features, (3, 3), padding=self.padding,
                           use_norm=self.use_norm, dtype=self.dtype,
                           bn_axis_name=self.bn_axis_name,
                           name=f"conv{i}")(x, train)
    return x


def depth_to_space(x: Array, block: int) -> Array:
  """[N, H, W, block*block*C] -> [N, block*H, block*W, C].

  Channel index (a*block + b)*C + c of input pixel (i, j) lands at output pixel
  (block*i + a, block*j + b), channel c (TensorFlow's DCR order).
  """
  n, h, w, c = x.shape
  out = c // (block * block)
  x = x.reshape(n, h, w, block, block, out)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, h * block, w * block, out)


class ConvTranspose2x(nn.Module):
  """Learned 2x upsampling: a 2x2 transposed conv with stride 2.

  With kernel == stride the output windows do not overlap: each input pixel
  alone produces a 2x2 output patch, i.e. a 1x1 conv to 4*C channels followed
  by depth-to-space. XLA lowers nn.ConvTranspose to a conv over a zero-stuffed
  input instead, about 2.4x slower for a whole U-Net step on CPU (docs/design.md,
  "Performance notes") and slow on cuDNN too, so `impl="fast"` (the default)
  uses the 1x1 form. `impl="xla"` runs lax.conv_transpose on the same params:
  the reference the fast form is tested and benchmarked against.

  Params are laid out exactly like nn.ConvTranspose(features, (2, 2),
  strides=(2, 2)): "kernel" [2, 2, C_in, features] and "bias" [features], so
  either module loads the other's weights. Flax, like lax.conv_transpose with
  transpose_kernel=False, applies the kernel spatially flipped: output pixel
  (2i + a, 2j + b) reads kernel[1 - a, 1 - b]. (PyTorch's ConvTranspose2d
  weight [C_in, C_out, 2, 2] maps to kernel = weight[:, :, ::-1, ::-1]
  transposed to [2, 2, C_in, C_out].)

  Attributes:
    features: output channels.
    use_bias: add a bias.
    impl: "fast" (1x1 conv + depth-to-space) or "xla" (lax.conv_transpose).
    dtype: compute dtype; params stay float32.
  """
  features: int
  use_bias: bool = True
  impl: str = "fast"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [N, H, W, C_in] -> [N, 2H, 2W, features] in `dtype`."""
    in_features = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (2, 2, in_features, self.features), jnp.float32)
    bias = (self.param("bias", nn.initializers.zeros, (self.features,),
                       jnp.float32) if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias,
                                              dtype=self.dtype)
    if self.impl == "fast":
      # [C_in, (a, b, C_out)] with (a, b) the output sub-pixel, hence the flip.
      matrix = kernel[::-1, ::-1].transpose(2, 0, 1, 3).reshape(
          in_features, 4 * self.features)
      y = depth_to_space(jnp.dot(x, matrix), 2)
    elif self.impl == "xla":
      y = jax.lax.conv_transpose(x, kernel, (2, 2), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    else:
      raise ValueError(f"impl must be 'fast' or 'xla', got {self.impl!r}")
    if bias is not None:
      y = y + bias
    return y


class BilinearUp2x(nn.Module):
  """Bilinear 2x upsampling then a 1x1 conv to `features` channels.

  Resizing uses half-pixel centres, i.e. PyTorch's align_corners=False (for
  upsampling jax.image.resize's triangle kernel equals PyTorch's bilinear
  interpolation with edge clamping). The 1x1 conv runs *before* the resize:
  both are linear and act on different axes, so they commute exactly, and
  the conv is then 4x cheaper at the low resolution.

  Attributes:
    features: output channels.
    dtype: compute dtype; params stay float32.
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [N, H, W, C_in] -> [N, 2H, 2W, features] in `dtype`."""
    x = nn.Conv(self.features, (1, 1), dtype=self.dtype, name="conv")(x)
    n, h, w, c = x.shape
    return resize(x, (2 * h, 2 * w)).astype(
        self.dtype)
