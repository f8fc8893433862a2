"""FCN-32s, FCN-16s and FCN-8s (Long, Shelhamer and Darrell, CVPR 2015).

The VGG-16 classifier made fully convolutional: the conv stages, fc6 as a
7x7 conv to 4096 channels and fc7 as a 1x1 conv to 4096 (each + ReLU +
dropout 0.5), and a 1x1 "score" conv to the classes on fc7 (score_fr). The
coarse stride-32 scores are upsampled by transposed convolutions initialised
to bilinear interpolation (segjax.ops.bilinear_kernel_init), and the finer
variants fuse, by summation, 1x1 score layers on pool4 (16s) and pool3 (8s):

  32s: score_fr --64x64/32--> logits
  16s: score_fr --4x4/2--> + score_pool4 --32x32/16--> logits
   8s: score_fr --4x4/2--> + score_pool4 --4x4/2--> + score_pool3 --16x16/8-->

As the paper describes, the 2x upsamplings start bilinear and are learned
(`learn_2x_upsampling=False` fixes them, as the reference repository's
released nets do with lr_mult 0), the final one is fixed bilinear
interpolation (`learn_final_upsampling=True` learns it too; no bias either
way), and the score layers start at zero (`zero_init_scores`).

Two alignments (`alignment`):

  "caffe"  the paper's nets exactly: conv1_1 padded by 100, ceil-mode
           pooling, fc6 an unpadded 7x7 conv, transposed convs without
           padding, and the crops of the reference voc-fcn*s net.py (found
           there by Caffe's coord_map): score_pool4 cropped at offset 5,
           score_pool3 at 9, the final upsampled scores at 19 (32s), 27
           (16s) or 31 (8s). The 100-pixel margin lets any input (>= 1 px)
           survive fc6; the crops put the scores back onto the image.
  "same"   padded convs, ceil-mode pooling and a 'same' 7x7 fc6: pixel i of
           a stride-s map then covers input pixels [s*i, s*i + s) and sits at
           s*i + (s - 1) / 2, so a 2f x 2f / f transposed conv padded by f/2
           (PyTorch's padding) is align_corners=False bilinear upsampling;
           every fused and final map is cropped at the top-left to the size
           of the finer map / the image. Any input size, cheaper (no margin).

Both return logits [N, H, W, K] float32 for any H, W. Weights: the conv
stages, fc6 and fc7 (params["backbone"], a `VGGFC`) take torchvision's
vgg16 ImageNet weights via segjax.convert ("vgg16_fc"), the classifier's
Linear layers reshaped into 7x7 and 1x1 conv kernels as in the paper.

Registered in segjax.models as "fcn32s", "fcn16s" and "fcn8s".
"""
import functools
from typing import Any, Dict, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.errors import ConfigError
from segjax.models.backbones.vgg import VGG, WIDTHS
from segjax.ops import bilinear_kernel_init, conv_transpose

Array = jax.Array
Dtype = Any

ALIGNMENTS = ("caffe", "same")
# Crop offsets of the reference Caffe nets (voc-fcn{32,16,8}s/net.py).
CAFFE_CROPS = {"score_pool4": 5, "score_pool3": 9,
               "32s": 19, "16s": 27, "8s": 31}
VARIANTS = {"32s": 32, "16s": 16, "8s": 8}
VGG16_STAGES = (2, 2, 3, 3, 3)


class VGGFC(nn.Module):
  """VGG-16 conv stages + fc6 (7x7 conv) + fc7 (1x1 conv), FCN's trunk.

  Attributes:
    alignment: "caffe" (conv1_1 padded by 100, unpadded fc6) or "same".
    stage_sizes: convs per VGG stage (VGG-16: (2, 2, 3, 3, 3)).
    widths: channels of the five VGG stages.
    fc_width: channels of fc6 and fc7 (4096).
    dropout: dropout rate after fc6 and fc7 (0.5); needs a "dropout" rng
      when train=True.
    dtype: compute dtype; params stay float32.
  """
  alignment: str = "caffe"
  stage_sizes: Sequence[int] = VGG16_STAGES
  widths: Sequence[int] = WIDTHS
  fc_width: int = 4096
  dropout: float = 0.5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> Dict[str, Array]:
    """images [N, H, W, 3] -> {"pool3", "pool4", "pool5", "fc7"} in `dtype`.

    With "same": pool{s} [N, ceil(H / 2**s), ...]; fc7 the size of pool5.
    With "caffe": every size first grows by 198, and fc7 is pool5 minus 6.
    """
    caffe = self.alignment == "caffe"
    features = VGG(tuple(self.stage_sizes), ceil_mode=True,
                   first_padding=100 if caffe else 1,
                   widths=tuple(self.widths), dtype=self.dtype,
                   name="features")(images, train)
    x = features["pool5"]
    # The ImageNet classifier's first two Linear layers, as convolutions.
    fc_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
    for name, kernel in (("fc6", (7, 7)), ("fc7", (1, 1))):
      x = nn.Conv(self.fc_width, kernel, padding="VALID" if caffe else "SAME",
                  dtype=self.dtype, kernel_init=fc_init, name=name)(x)
      x = nn.relu(x)
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return {**features, "fc7": x}


class BilinearConvTranspose(nn.Module):
  """A transposed conv (no bias) starting as bilinear upsampling.

  PyTorch's ConvTranspose2d(K, K, kernel_size, stride, padding, bias=False)
  via segjax.ops.conv_transpose (its fast sub-pixel form). With learned=False
  the kernel is the constant bilinear filter and the module has no params.

  Attributes:
    features: output channels (= input channels: the filter is diagonal).
    kernel_size: k (2 * stride for FCN).
    stride: upsampling factor.
    padding: PyTorch's padding (0 in the Caffe nets).
    learned: make the kernel a param (initialised bilinear).
    dtype: compute dtype.
  """
  features: int
  kernel_size: int
  stride: int
  padding: int = 0
  learned: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [N, h, w, C] -> [N, (h-1)*s - 2p + k, ..., features]."""
    shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
    if self.learned:
      kernel = self.param("kernel", bilinear_kernel_init, shape, jnp.float32)
    else:
      kernel = bilinear_kernel_init(None, shape)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    return conv_transpose(x, kernel, self.stride, self.padding)


def _crop(x: Array, offset: int, height: int, width: int) -> Array:
  """[N, H, W, C] -> [N, height, width, C] from (offset, offset) (Caffe's Crop)."""
  if x.shape[1] < offset + height or x.shape[2] < offset + width:
    raise AssertionError(f"cannot crop {x.shape} at {offset} to "
                         f"{(height, width)}")
  return x[:, offset:offset + height, offset:offset + width, :]


class FCN(nn.Module):
  """FCN-32s / 16s / 8s on VGG-16 (see the module docstring).

  Attributes:
    num_classes: number of output classes K.
    variant: "32s", "16s" or "8s".
    alignment: "caffe" (the paper's nets) or "same"; see the module docstring.
    learn_2x_upsampling: learn the 2x transposed convs (the paper does).
    learn_final_upsampling: learn the final transposed conv (the paper fixes
      it to bilinear interpolation).
    zero_init_scores: initialise the 1x1 score layers to zero, as the paper
      does (with zeros, the trunk gets no gradient until the score layers
      move off zero).
    widths: VGG stage widths (the paper's (64, 128, 256, 512, 512)); smaller
      values only make tests fast.
    stage_sizes: convs per VGG stage (VGG-16's (2, 2, 3, 3, 3); fewer only
      make tests compile fast).
    fc_width: fc6/fc7 channels (4096).
    dropout: dropout rate after fc6 and fc7 (0.5).
    dtype: compute dtype; params are float32 and the logits float32.
    bn_axis_name: accepted for a uniform model interface; FCN has no
      BatchNorm.
  """
  num_classes: int
  variant: str = "8s"
  alignment: str = "caffe"
  learn_2x_upsampling: bool = True
  learn_final_upsampling: bool = False
  zero_init_scores: bool = True
  widths: Sequence[int] = WIDTHS
  stage_sizes: Sequence[int] = VGG16_STAGES
  fc_width: int = 4096
  dropout: float = 0.5
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ConfigError(f"fcn: variant={self.variant!r} is not supported; "
                        f"choose one of {', '.join(VARIANTS)}.")
    if self.alignment not in ALIGNMENTS:
      raise ConfigError(f"fcn: alignment={self.alignment!r} is not "
                        f"supported; choose one of {', '.join(ALIGNMENTS)}.")
    if self.num_classes < 1 or self.fc_width < 1:
      raise ConfigError(f"fcn: num_classes and fc_width must be >= 1, got "
                        f"{self.num_classes}, {self.fc_width}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"fcn: dropout must be in [0, 1), got {self.dropout}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> Dict[str, Array]:
    """Segments a batch of images.

    Args:
      images: [N, H, W, 3] float, normalised; any H, W >= 1.
      train: use dropout (needs a "dropout" rng).

    Returns:
      {"logits": [N, H, W, K] float32}.
    """
    if images.ndim != 4:
      raise ValueError(f"images must be [N, H, W, C], got {images.shape}")
    _, h, w, _ = images.shape
    caffe = self.alignment == "caffe"
    k = self.num_classes
    features = VGGFC(self.alignment, tuple(self.stage_sizes),
                     tuple(self.widths), self.fc_width, self.dropout,
                     dtype=self.dtype, name="backbone")(images, train)
    score = functools.partial(
        nn.Conv, k, (1, 1), dtype=self.dtype,
        kernel_init=(nn.initializers.zeros if self.zero_init_scores else
                     nn.initializers.lecun_normal()))

    def up(x, factor, name):
      # Caffe: no padding, the crop offsets realign. "same": padding f/2
      # centres the bilinear filter (see the module docstring).
      return BilinearConvTranspose(k, 2 * factor, factor,
                                   0 if caffe else factor // 2,
                                   self.learn_2x_upsampling,
                                   dtype=self.dtype, name=name)(x)

    def fuse(coarse, feature, name):
      # The upsampled coarse scores and the finer pool's scores, on the
      # finer map's grid: Caffe crops the score layer, "same" the upsampled.
      skip = score(name=f"score_{name}")(feature)
      if caffe:
        skip = _crop(skip, CAFFE_CROPS[f"score_{name}"], *coarse.shape[1:3])
      else:
        coarse = _crop(coarse, 0, *skip.shape[1:3])
      return coarse + skip

    x = score(name="score_fr")(features["fc7"])
    if self.variant in ("16s", "8s"):
      x = fuse(up(x, 2, "upscore2"), features["pool4"], "pool4")
    if self.variant == "8s":
      x = fuse(up(x, 2, "upscore_pool4"), features["pool3"], "pool3")
    factor = VARIANTS[self.variant]
    # The final upsampling in float32, like the logits the losses see.
    x = BilinearConvTranspose(k, 2 * factor, factor, 0 if caffe else factor // 2,
                              self.learn_final_upsampling, dtype=jnp.float32,
                              name=f"upscore{factor}")(x.astype(jnp.float32))
    logits = _crop(x, CAFFE_CROPS[self.variant] if caffe else 0, h, w)
    return {"logits": logits.astype(jnp.float32)}


FCN32s = functools.partial(FCN, variant="32s")
FCN16s = functools.partial(FCN, variant="16s")
FCN8s = functools.partial(FCN, variant="8s")
