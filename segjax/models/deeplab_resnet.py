"""The ResNet DeepLab models: DeepLab v2, v3 and v3+ (Chen et al.).

All three share one trunk, backbones.resnet.ResNet (torchvision's v1.5
layout, params["backbone"], so torchvision's ImageNet resnet50/resnet101
weights convert into it: segjax.weights.resnet_into), made dense by trading
strides for atrous rates. ResNet-101 ((3, 4, 23, 3)) is the default, as in
the papers' best results; ResNet-50 is `stage_sizes=(3, 4, 6, 3)`. Logits
are bilinearly upsampled (PyTorch's align_corners=False) to the input size
in float32; everything else computes in `dtype`.

DeepLab v2 (TPAMI 2017), "deeplab_v2": ResNet at output stride 8 and ASPP-L,
four parallel 3x3 atrous convs with rates 6, 12, 18, 24 (the reference's
fc1_voc12_c0..c3, with bias, no BN, Gaussian init std 0.01), each straight
to class scores, SUMMED. Optional fully connected CRF at inference (`crf`).

DeepLab v3 ("Rethinking atrous convolution", 2017), "deeplab_v3": ResNet at
output stride 16 (or 8), multi-grid (1, 2, 4) on the last stage (its three
blocks at rates 2, 4, 8 at OS 16), ASPP: a 1x1 conv, three 3x3 atrous convs
(rates 6, 12, 18 at OS 16, doubled at OS 8) and image-level pooling (global
mean, 1x1 conv, BN, ReLU, broadcast back), each 256 channels with BN + ReLU;
concatenated, projected by a 1x1 conv to 256 + BN + ReLU, dropout 0.1 (the
TF reference's keep_prob 0.9; torchvision uses 0.5), 1x1 conv to classes.
The ASPP is torchvision_seg.ASPP; torchvision's DeepLabHead adds a 3x3 conv
after it, which the paper does not have. Optional auxiliary FCN head on C4
(torchvision's, `aux=True`, outputs["aux"]).

DeepLab v3+ (ECCV 2018), "deeplab_v3_plus": the v3 encoder (ASPP output,
before the classifier), then a decoder: C2 (stride 4) reduced by a 1x1 conv
to 48 channels + BN + ReLU, the encoder output bilinearly upsampled to C2's
size (x4 at OS 16), concatenated, two 3x3 convs to 256 + BN + ReLU, a 1x1
conv to classes, bilinearly upsampled (x4) to the input. This is the
paper's ResNet-101 variant; its modified aligned Xception backbone and
depthwise-separable ASPP/decoder convs are not provided.

Deviations from the Caffe/TF references, all for torchvision weight
compatibility or simplicity: the ResNet is v1.5 (stride in the 3x3 conv) and
a dilated stage's first block keeps the previous rate (torchvision's
replace_stride_with_dilation; the Caffe v2 model dilates the whole stage);
BN is trainable by default (the Caffe v2 model froze it: pass
frozen_bn=True, meaningful once ImageNet weights are loaded); no multi-scale
input fusion (v2's MSC) and no test-time augmentation here (see
segjax.inference).

CRF (DeepLab v2, `crf=True`): at inference (train=False) the upsampled
logits are refined by segjax.ops.dense_crf with the v2 ResNet-101 VOC
parameters (DEEPLAB_V2_CRF, `crf_kwargs` to override) and returned as
log-probabilities, so softmax/argmax of "logits" read the CRF marginals;
"unary_logits" keeps the CNN's. The CRF's bilateral kernel needs the RGB
image in 0..255: pass it as `crf_image`, or it is recovered from the
normalised input as images * std + mean (`mean`/`std`: the pipeline's
normalisation in pixel units, ImageNet's by default). Training never runs
the CRF, as in the paper.
"""
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.errors import ConfigError
from segjax.models.backbones.resnet import ResNet, block_schedule
from segjax.models.layers import ConvBNAct
from segjax.models.torchvision_seg import ASPP, aux_logits, upsample_logits
from segjax.models.crf_option import (IMAGENET_MEAN, IMAGENET_STD, check_crf_options,
                                      refine_with_crf)
from segjax.ops import resize

Array = jax.Array
Dtype = Any

RESNET101 = (3, 4, 23, 3)
# DeepLab v2 ResNet-101's CRF for VOC 2012 (bi_w 4, bi_xy_std 67,
# bi_rgb_std 3, pos_w 3, pos_xy_std 1, 10 mean-field iterations).
DEEPLAB_V2_CRF = dict(num_iters=10, gaussian_sxy=1.0, gaussian_compat=3.0,
                      bilateral_sxy=67.0, bilateral_srgb=3.0,
                      bilateral_compat=4.0)


def _check(model: nn.Module, output_strides: Sequence[int],
           multi_grid: Optional[Sequence[int]] = None) -> None:
  """Raises ConfigError for bad options now, not at the first call."""
  name = type(model).__name__
  if model.num_classes < 1:
    raise ConfigError(f"{name}: num_classes must be >= 1, got "
                      f"{model.num_classes}.")
  if model.output_stride not in output_strides:
    raise ConfigError(f"{name}: output_stride must be one of "
                      f"{tuple(output_strides)}, got {model.output_stride}.")
  block_schedule(model.stage_sizes, model.output_stride, multi_grid)


# =============================================================================
# DeepLab v2
# =============================================================================


class ASPPL(nn.Module):
  """DeepLab v2's ASPP-L: parallel 3x3 atrous convs to classes, summed.

  Branch i is the reference's fc1_voc12_c{i}: a 3x3 conv with dilation and
  padding rates[i], with bias, no BN or ReLU, weights ~ N(0, 0.01^2), bias 0.

  Attributes:
    num_classes: output channels K of every branch.
    rates: one atrous rate per branch.
    dtype: compute dtype; params stay float32.
  """
  num_classes: int
  rates: Sequence[int] = (6, 12, 18, 24)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [N, h, w, C] -> summed scores [N, h, w, K] in `dtype`."""
    out = 0
    for i, r in enumerate(self.rates):
      out = out + nn.Conv(self.num_classes, (3, 3), padding=((r, r), (r, r)),
                          kernel_dilation=(r, r), dtype=self.dtype,
                          kernel_init=nn.initializers.normal(0.01),
                          name=f"c{i}")(x)
    return out


class DeepLabV2(nn.Module):
  """DeepLab v2: ResNet at output stride 8 + ASPP-L, optional dense CRF.

  Attributes:
    num_classes: number of output classes K.
    stage_sizes: ResNet blocks per stage (ResNet-101 default; (3, 4, 6, 3)
      is ResNet-50; (1, 1, 1, 1) for tests).
    width: ResNet base width (64); smaller values only make tests fast.
    output_stride: backbone output stride (8 in the paper; 16 or 32 allowed).
    rates: ASPP-L atrous rates, one branch each ((6, 12, 18, 24): ASPP-L).
    frozen_bn: the backbone's BN always uses its running statistics (the
      reference's Caffe setting); useful only with converted ImageNet weights.
    crf: refine the logits with the dense CRF at inference.
    crf_kwargs: dense_crf options overriding DEEPLAB_V2_CRF (and "method").
    mean, std: the input normalisation (RGB, 0..255 units), to recover the
      CRF's image when no crf_image is given.
    dtype: compute dtype; params and logits are float32.
    bn_axis_name: pmap axis name for synchronised BatchNorm statistics.
    remat: recompute the backbone's blocks in the backward pass instead of
      storing their activations (segjax.models.remat).
  """
  num_classes: int
  stage_sizes: Sequence[int] = RESNET101
  width: int = 64
  output_stride: int = 8
  rates: Sequence[int] = (6, 12, 18, 24)
  frozen_bn: bool = False
  crf: bool = False
  crf_kwargs: Optional[Mapping[str, Any]] = None
  mean: Sequence[float] = IMAGENET_MEAN
  std: Sequence[float] = IMAGENET_STD
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None
  remat: bool = False

  def __post_init__(self):
    _check(self, (8, 16, 32))
    if not self.rates or min(self.rates) < 1:
      raise ConfigError(f"deeplab_v2: rates must be positive ints, got "
                        f"{tuple(self.rates)}.")
    check_crf_options("deeplab_v2", self.crf_kwargs, DEEPLAB_V2_CRF, self.mean,
                      self.std)
    super().__post_init__()

  @nn.compact
  def __call__(self, images: Array, train: bool = False,
               crf_image: Optional[Array] = None) -> Dict[str, Array]:
    """Segments a batch of images.

    Args:
      images: [N, H, W, 3] float, normalised; any H, W >= 1.
      train: use batch statistics in BatchNorm (unless frozen_bn); never
        runs the CRF.
      crf_image: [N, H, W, 3] RGB in 0..255 (uint8 or float) for the CRF;
        default: images * std + mean.

    Returns:
      {"logits": [N, H, W, K] float32}; with crf and train=False the logits
      are the CRF's log-marginals and "unary_logits" [N, H, W, K] float32
      the CNN's.
    """
    if images.ndim != 4:
      raise ValueError(f"images must be [N, H, W, C], got {images.shape}")
    features = ResNet(self.stage_sizes, self.width, self.output_stride,
                      frozen_bn=self.frozen_bn, dtype=self.dtype,
                      bn_axis_name=self.bn_axis_name, remat=self.remat,
                      name="backbone")(images, train)
    scores = ASPPL(self.num_classes, self.rates, dtype=self.dtype,
                   name="aspp")(features["c5"])
    logits = upsample_logits(scores, images.shape[1:3])
    if not self.crf or train:
      return {"logits": logits}
    return refine_with_crf(logits, images, crf_image, self.mean, self.std,
                           {**DEEPLAB_V2_CRF, **(self.crf_kwargs or {})})


# =============================================================================
# DeepLab v3 and v3+
# =============================================================================


class DeepLabV3(nn.Module):
  """DeepLab v3: ResNet (multi-grid) at OS 16 or 8 + ASPP with image pooling.

  Attributes:
    num_classes: number of output classes K.
    stage_sizes: ResNet blocks per stage (ResNet-101 default; (3, 4, 6, 3)
      is ResNet-50).
    width: ResNet base width (64); smaller values only make tests fast.
    output_stride: 16 (default) or 8.
    multi_grid: unit rates of the last stage's blocks ((1, 2, 4), the
      paper's best; one per block, so None or e.g. (1,) for a one-block
      test stage); None gives torchvision's rates.
    rates: the ASPP's three atrous rates; None: (6, 12, 18) at OS 16,
      doubled at OS 8 (see `atrous_rates`).
    aspp_channels: channels of every ASPP branch and its projection (256).
    dropout: dropout after the ASPP projection (0.1, the TF reference).
    aux: add torchvision's auxiliary FCNHead on C4; its upsampled logits are
      outputs["aux"][0].
    frozen_bn: the backbone's BN always uses its running statistics.
    dtype: compute dtype; params and logits are float32.
    bn_axis_name: pmap axis name for synchronised BatchNorm statistics.
    remat: recompute the backbone's blocks in the backward pass instead of
      storing their activations (segjax.models.remat).
  """
  num_classes: int
  stage_sizes: Sequence[int] = RESNET101
  width: int = 64
  output_stride: int = 16
  multi_grid: Optional[Sequence[int]] = (1, 2, 4)
  rates: Optional[Sequence[int]] = None
  aspp_channels: int = 256
  dropout: float = 0.1
  aux: bool = False
  frozen_bn: bool = False
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None
  remat: bool = False

  def __post_init__(self):
    _check(self, (8, 16), self.multi_grid)
    if self.rates is not None and (len(self.rates) != 3
                                   or min(self.rates) < 1):
      raise ConfigError(f"{type(self).__name__}: rates must be 3 positive "
                        f"ints, got {tuple(self.rates)}.")
    super().__post_init__()

  @property
  def atrous_rates(self) -> Tuple[int, ...]:
    """The ASPP's rates: `rates`, or (6, 12, 18) * 16 / output_stride.

    The paper doubles them at OS 8 so that each branch keeps its field of
    view in input pixels.
    """
    if self.rates is not None:
      return tuple(self.rates)
    return tuple(r * 16 // self.output_stride for r in (6, 12, 18))

  def _encode(self, images: Array, train: bool):
    """-> (backbone features, ASPP output [N, H/OS, W/OS, aspp_channels])."""
    features = ResNet(self.stage_sizes, self.width, self.output_stride,
                      self.multi_grid, frozen_bn=self.frozen_bn,
                      dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                      remat=self.remat, name="backbone")(images, train)
    x = ASPP(self.atrous_rates, self.aspp_channels, self.dropout,
             dtype=self.dtype, bn_axis_name=self.bn_axis_name,
             name="aspp")(features["c5"], train)
    return features, x

  def _decode(self, features: Dict[str, Array], x: Array,
              train: bool) -> Array:
    """ASPP output -> class scores at the ASPP's resolution."""
    del features, train
    return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype,
                   name="classifier")(x)

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
    features, x = self._encode(images, train)
    outputs = {"logits": upsample_logits(self._decode(features, x, train), size)}
    if self.aux:
      outputs["aux"] = [aux_logits(features["c4"], size, self.num_classes, train,
                                   self.dtype, self.bn_axis_name)]
    return outputs


class Decoder(nn.Module):
  """DeepLab v3+'s decoder: fuse the encoder output with stride-4 features.

  Attributes:
    num_classes: output channels K.
    low_level_channels: channels C2 is reduced to (48).
    channels: channels of the two 3x3 convs (256).
    dtype: compute dtype.
    bn_axis_name: pmap axis name for BatchNorm statistics.
  """
  num_classes: int
  low_level_channels: int = 48
  channels: int = 256
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: Array, low: Array, train: bool = False) -> Array:
    """x: [N, h, w, C] encoder output, low: [N, H/4, W/4, C2] features ->
    scores [N, H/4, W/4, K] in `dtype`."""
    block = lambda features, kernel, name: ConvBNAct(
        features, kernel, dtype=self.dtype, bn_axis_name=self.bn_axis_name,
        name=name)
    # Few low-level channels, so they do not outweigh the encoder's 256
    # (the paper's ablation: 48 works best).
    low = block(self.low_level_channels, (1, 1), "reduce")(low, train)
    x = resize(x, low.shape[1:3]).astype(self.dtype)
    x = jnp.concatenate([x, low], axis=-1)
    x = block(self.channels, (3, 3), "fuse_0")(x, train)
    x = block(self.channels, (3, 3), "fuse_1")(x, train)
    return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype,
                   name="classifier")(x)


class DeepLabV3Plus(DeepLabV3):
  """DeepLab v3+: the v3 encoder + a decoder on C2 (stride 4).

  Attributes (besides DeepLabV3's, whose classifier this replaces):
    low_level_channels: channels C2 is reduced to (48).
    decoder_channels: channels of the decoder's 3x3 convs (256).
  """
  low_level_channels: int = 48
  decoder_channels: int = 256

  def _decode(self, features: Dict[str, Array], x: Array,
              train: bool) -> Array:
    return Decoder(self.num_classes, self.low_level_channels,
                   self.decoder_channels, dtype=self.dtype,
                   bn_axis_name=self.bn_axis_name,
                   name="decoder")(x, features["c2"], train)
