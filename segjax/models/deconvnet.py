"""DeconvNet (Noh, Hong and Han, ICCV 2015).

The convolution network is VGG-16 with BatchNorm after every conv (as in the
paper's released Caffe model; torchvision's vgg16_bn `features` load into
params/batch_stats["encoder"] via segjax.convert "vgg16_bn"), followed by
fc6, a 7x7 unpadded conv to 4096 channels (a 224x224 proposal's 7x7 pool5
becomes 1x1), and fc7, a 1x1 conv to 4096, each + BN + ReLU. The
deconvolution network mirrors it:

  deconv-fc6   7x7 transposed conv back to 7x7x512 (+ BN + ReLU)
  per stage    max unpooling with the encoder's pooling switches (values go
               back where the maxima were), then 3x3 "deconvolution" layers
               + BN + ReLU: 512, 512, 512 / 512, 512, 256 / 256, 256, 128 /
               128, 64 / 64, 64
  seg-score    1x1 conv to the classes

A 3x3 transposed conv with stride 1 and padding 1 is a 3x3 conv with the
kernel flipped, so the per-stage deconvolution layers are plain convs (the
same function class, cheaper on XLA); deconv-fc6, which grows the map by 6,
is a real transposed conv (segjax.ops.conv_transpose).

Input size: fc6 needs a pool5 of at least 7x7, i.e. an input of at least
224 pixels, and the unpoolings need even sizes. The paper segments 224x224
object proposals; here any image is zero-padded at the bottom/right to a
multiple of 32 and to at least `min_size` (224) pixels, and the logits are
cropped back, so any H, W works (larger inputs give a larger fc6 map).

Registered in segjax.models as "deconvnet".
"""
from typing import Any, Dict, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.errors import ConfigError
from segjax.models.backbones.vgg import VGG, WIDTHS
from segjax.models.layers import BN_EPSILON, BN_MOMENTUM, ConvBNAct
from segjax.models.segnet import VGG16_STAGES, UnpoolDecoder, pad_to_multiple
from segjax.ops import conv_transpose

Array = jax.Array
Dtype = Any

FC6_KERNEL = 7


class ConvTransposeBNReLU(nn.Module):
  """Stride-1 transposed conv (PyTorch's ConvTranspose2d, no bias) + BN + ReLU.

  Attributes:
    features: output channels.
    kernel_size: k; the output grows by k - 1.
    dtype: compute dtype.
    bn_axis_name: pmap axis name for BatchNorm statistics.
  """
  features: int
  kernel_size: int
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """x: [N, h, w, C] -> [N, h + k - 1, w + k - 1, features]."""
    k = self.kernel_size
    kernel = self.param("kernel", nn.initializers.kaiming_normal(),
                        (k, k, x.shape[-1], self.features), jnp.float32)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    x = conv_transpose(x, kernel, 1)
    x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                     epsilon=BN_EPSILON, dtype=self.dtype,
                     axis_name=self.bn_axis_name, name="bn")(x)
    return nn.relu(x)


class DeconvNet(nn.Module):
  """DeconvNet (see the module docstring).

  Attributes:
    num_classes: number of output classes K.
    widths: encoder stage widths (the paper's (64, 128, 256, 512, 512));
      smaller values only make tests fast.
    stage_sizes: encoder (and mirrored decoder) convs per stage (VGG-16's
      (2, 2, 3, 3, 3); fewer only make tests compile fast).
    fc_width: fc6/fc7 channels (4096).
    min_size: smallest padded input side (224, the paper's proposals; at
      least 224 so that fc6's 7x7 window fits in pool5).
    dtype: compute dtype; params and BN statistics float32, logits float32.
    bn_axis_name: pmap axis name for synchronised BatchNorm statistics.
  """
  num_classes: int
  widths: Sequence[int] = WIDTHS
  stage_sizes: Sequence[int] = VGG16_STAGES
  fc_width: int = 4096
  min_size: int = 224
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  def __post_init__(self):
    if self.num_classes < 1 or self.fc_width < 1:
      raise ConfigError(f"deconvnet: num_classes and fc_width must be >= 1, "
                        f"got {self.num_classes}, {self.fc_width}.")
    if self.min_size < 32 * FC6_KERNEL:
      raise ConfigError(f"deconvnet: min_size must be >= {32 * FC6_KERNEL} "
                        f"(fc6's 7x7 window on pool5), got {self.min_size}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> Dict[str, Array]:
    """Segments a batch of images.

    Args:
      images: [N, H, W, 3] float, normalised; any H, W >= 1.
      train: use batch statistics (and update batch_stats).

    Returns:
      {"logits": [N, H, W, K] float32}.
    """
    if images.ndim != 4:
      raise ValueError(f"images must be [N, H, W, C], got {images.shape}")
    _, h, w, _ = images.shape
    x = pad_to_multiple(images, 32, self.min_size)
    block = lambda features, kernel, padding, name: ConvBNAct(
        features, kernel, padding=padding, dtype=self.dtype,
        bn_axis_name=self.bn_axis_name, name=name)
    encoder = VGG(tuple(self.stage_sizes), batch_norm=True,
                  widths=tuple(self.widths), return_indices=True,
                  dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                  name="encoder")(x, train)
    x = block(self.fc_width, (FC6_KERNEL, FC6_KERNEL), "VALID", "fc6")(
        encoder["pool5"], train)
    x = block(self.fc_width, (1, 1), "VALID", "fc7")(x, train)
    x = ConvTransposeBNReLU(self.widths[-1], FC6_KERNEL, dtype=self.dtype,
                            bn_axis_name=self.bn_axis_name,
                            name="deconv_fc6")(x, train)
    x = UnpoolDecoder(tuple(self.widths), tuple(self.stage_sizes),
                      last_stage_convs=self.stage_sizes[0],
                      name_format="deconv{s}_{i}", count_down=False,
                      dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                      name="decoder")(x, encoder, train)
    logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype,
                     name="seg_score")(x)
    return {"logits": logits[:, :h, :w, :].astype(jnp.float32)}
