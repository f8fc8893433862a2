"""DeepLab models (Chen et al.).

Each version lives in its own clearly separated section of this file.

== DeepLab v1, DeepLab-LargeFOV (Chen et al., ICLR 2015) ====================

VGG-16 made dense with atrous convolution, following the released Caffe
prototxt (DeepLab-LargeFOV/train.prototxt):

  conv1..conv3   3x3 convs, each stage pooled 3x3, stride 2, pad 1
  conv4          3x3 convs, pooled 3x3, stride 1, pad 1 (no subsampling)
  conv5          3x3 convs with dilation 2, pooled 3x3, stride 1, pad 1
  fc6            3x3 conv, dilation 12, 1024 channels, ReLU, dropout 0.5
  fc7            1x1 conv, 1024 channels, ReLU, dropout 0.5
  fc8            1x1 conv to the classes

Output stride 8. The Caffe pooling (ceil mode, pad 1) maps an input of
8k + 1 pixels to k + 1 score pixels with score pixel i centred on input pixel
8i (321 -> 41, 513 -> 65). So the image is zero-padded at the bottom/right
to the next 8k + 1 (zeros are the mean colour, as DeepLab pads its crops
with the mean), the scores are bilinearly upsampled by exactly 8 with
align_corners=True (k + 1 -> 8k + 1; DeepLab's Interp layer), and cropped
back: logits [N, H, W, K] for any H, W.

Fully connected CRF (`crf=True`): at inference (train=False) the upsampled
logits are refined by segjax.ops.dense_crf (mean field, DeepLab's VOC
parameters by default, `crf_kwargs` to override) and returned as
log-probabilities, so softmax/argmax of "logits" read the CRF marginals;
"unary_logits" keeps the CNN's. The CRF's bilateral kernel needs the RGB
image in 0..255: pass it as `crf_image` to __call__, or it is recovered
from the normalised input as images * std + mean (`mean`/`std`, the
pipeline's normalisation, ImageNet's in pixel units by default). Training
(train=True) never runs the CRF; DeepLab trains the CNN alone.

Weights: params["backbone"]["features"] is a backbones.vgg.VGG, so
torchvision's vgg16 features convert into it with segjax.convert "vgg16"
(pooling and dilation have no params; see weights.vgg16_into). The paper initialises fc6/fc7 from VGG's fc6/fc7
subsampled (4096 -> 1024 channels, 7x7 -> 3x3 taps); that is not provided:
fc6-fc8 start from scratch.

Registered in segjax.models as "deeplab_v1".
"""
from typing import Any, Dict, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.errors import ConfigError
from segjax.models.backbones.vgg import VGG, WIDTHS
from segjax.models.crf_option import (IMAGENET_MEAN, IMAGENET_STD, check_crf_options,
                                      refine_with_crf)
from segjax.ops import resize

Array = jax.Array
Dtype = Any

# =============================================================================
# DeepLab v1 (LargeFOV)
# =============================================================================

VGG16_STAGES = (2, 2, 3, 3, 3)
# DeepLab-LargeFOV's CRF for VOC 2012 (bi_w 4, bi_xy_std 121, bi_rgb_std 5,
# pos_w 3, pos_xy_std 3, 10 mean-field iterations).
DEEPLAB_V1_CRF = dict(num_iters=10, gaussian_sxy=3.0, gaussian_compat=3.0,
                      bilateral_sxy=121.0, bilateral_srgb=5.0,
                      bilateral_compat=4.0)


class VGGLargeFOVTrunk(nn.Module):
  """DeepLab v1's VGG-16 at output stride 8 with fc6 (dilated 3x3) and fc7.

  Attributes:
    stage_sizes, widths: the VGG's convs per stage and channels.
    fc_width: fc6/fc7 channels (1024).
    fc6_dilation: fc6's atrous rate (12: LargeFOV's 224-pixel field of view
      at stride 8).
    dropout: dropout after fc6 and fc7 (0.5).
    dtype: compute dtype.
  """
  stage_sizes: Sequence[int] = VGG16_STAGES
  widths: Sequence[int] = WIDTHS
  fc_width: int = 1024
  fc6_dilation: int = 12
  dropout: float = 0.5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> Dict[str, Array]:
    """images [N, 8k+1, 8l+1, 3] -> {"conv5": pool5 [N, k+1, l+1, C5],
    "fc7": [N, k+1, l+1, fc_width]} in `dtype`."""
    features = VGG(tuple(self.stage_sizes), ceil_mode=True,
                   widths=tuple(self.widths), pool_window=3,
                   pool_strides=(2, 2, 2, 1, 1), dilations=(1, 1, 1, 1, 2),
                   dtype=self.dtype, name="features")(images, train)
    x = features["pool5"]
    rate = self.fc6_dilation
    # "SAME" pads a stride-1 dilated 3x3 conv by its rate: Caffe's pad 12.
    x = nn.Conv(self.fc_width, (3, 3), kernel_dilation=(rate, rate),
                dtype=self.dtype, name="fc6")(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(x))
    x = nn.Conv(self.fc_width, (1, 1), dtype=self.dtype, name="fc7")(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(x))
    return {"conv5": features["pool5"], "fc7": x}


def pad_to_8k_plus_1(images: Array) -> Array:
  """Zero-pads [N, H, W, C] at the bottom/right to sizes 8k + 1 >= H, W."""
  _, h, w, _ = images.shape
  pads = [(0, -(size - 1) % 8) for size in (h, w)]
  if not any(p for _, p in pads):
    return images
  return jnp.pad(images, [(0, 0), *pads, (0, 0)])


def upsample_by_8(scores: Array) -> Array:
  """[N, k+1, l+1, K] -> [N, 8k+1, 8l+1, K]: pixel i to 8i, bilinear."""
  _, h, w, _ = scores.shape
  return resize(scores, (8 * (h - 1) + 1, 8 * (w - 1) + 1),
                align_corners=True)


class DeepLabV1(nn.Module):
  """DeepLab-LargeFOV on VGG-16 with an optional dense CRF (module docstring).

  Attributes:
    num_classes: number of output classes K.
    widths: VGG stage widths (the paper's (64, 128, 256, 512, 512));
      smaller values only make tests fast.
    stage_sizes: convs per VGG stage ((2, 2, 3, 3, 3)).
    fc_width: fc6/fc7 channels (1024).
    fc6_dilation: fc6's atrous rate (12).
    dropout: dropout rate after fc6 and fc7 (0.5); needs a "dropout" rng
      when train=True.
    crf: refine the logits with the dense CRF at inference.
    crf_kwargs: dense_crf options overriding DEEPLAB_V1_CRF (e.g.
      {"num_iters": 5, "method": "fast"}).
    mean, std: the input normalisation (RGB, 0..255 units), to recover the
      CRF's image when no crf_image is given.
    dtype: compute dtype; params float32, logits float32.
    bn_axis_name: accepted for a uniform model interface; no BatchNorm.
  """
  num_classes: int
  widths: Sequence[int] = WIDTHS
  stage_sizes: Sequence[int] = VGG16_STAGES
  fc_width: int = 1024
  fc6_dilation: int = 12
  dropout: float = 0.5
  crf: bool = False
  crf_kwargs: Optional[Mapping[str, Any]] = None
  mean: Sequence[float] = IMAGENET_MEAN
  std: Sequence[float] = IMAGENET_STD
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  def __post_init__(self):
    if self.num_classes < 1 or self.fc_width < 1 or self.fc6_dilation < 1:
      raise ConfigError(
          f"deeplab_v1: num_classes, fc_width and fc6_dilation must be >= 1, "
          f"got {self.num_classes}, {self.fc_width}, {self.fc6_dilation}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"deeplab_v1: dropout must be in [0, 1), got "
                        f"{self.dropout}.")
    check_crf_options("deeplab_v1", self.crf_kwargs, DEEPLAB_V1_CRF, self.mean,
                      self.std)
    super().__post_init__()

  @nn.compact
  def __call__(self, images: Array, train: bool = False,
               crf_image: Optional[Array] = None) -> Dict[str, Array]:
    """Segments a batch of images.

    Args:
      images: [N, H, W, 3] float, normalised; any H, W >= 1.
      train: use dropout (needs a "dropout" rng); never runs the CRF.
      crf_image: [N, H, W, 3] RGB in 0..255 (uint8 or float) for the CRF;
        default: images * std + mean.

    Returns:
      {"logits": [N, H, W, K] float32}; with crf and train=False the logits
      are the CRF's log-probabilities and "unary_logits" the CNN's.
    """
    if images.ndim != 4:
      raise ValueError(f"images must be [N, H, W, C], got {images.shape}")
    _, h, w, _ = images.shape
    features = VGGLargeFOVTrunk(
        tuple(self.stage_sizes), tuple(self.widths), self.fc_width,
        self.fc6_dilation, self.dropout, dtype=self.dtype,
        name="backbone")(pad_to_8k_plus_1(images), train)
    scores = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype,
                     kernel_init=nn.initializers.normal(0.01),
                     name="fc8")(features["fc7"])
    logits = upsample_by_8(scores.astype(jnp.float32))[:, :h, :w, :]
    if not self.crf or train:
      return {"logits": logits}
    return refine_with_crf(logits, images, crf_image, self.mean, self.std,
                           {**DEEPLAB_V1_CRF, **(self.crf_kwargs or {})})
