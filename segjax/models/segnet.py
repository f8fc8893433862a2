"""SegNet (Badrinarayanan, Kendall and Cipolla, TPAMI 2017).

An encoder-decoder with no fully connected layers. The encoder is the 13
convs of VGG-16 with BatchNorm (torchvision's vgg16_bn `features`, so its
ImageNet weights load via segjax.convert "vgg16_bn" into
params/batch_stats["encoder"]); each 2x2 max pooling remembers its argmax
("pooling indices"). The decoder mirrors it: every stage starts by max
unpooling with the indices of the matching encoder pooling (the value goes
back exactly where the encoder found the maximum, zeros elsewhere; no
learning, no skip features), then 3x3 conv + BN + ReLU layers densify the
sparse map. Decoder widths mirror the encoder's, the last conv of a stage
stepping down to the next stage's width, as in the paper's Caffe net:

  stage 5: 512, 512, 512    stage 4: 512, 512, 256    stage 3: 256, 256, 128
  stage 2: 128, 64          stage 1: 64, then the classifier (conv1_1_D)

The classifier is a 3x3 conv to the classes (conv1_1_D; `classifier_kernel`
1 gives a 1x1). Any input size: the image is zero-padded at the bottom/right
to a multiple of 32, so every pooling sees even sizes and unpooling restores
them exactly, and the logits are cropped back.

`UnpoolDecoder` is shared with DeconvNet (deconvnet.py).

Registered in segjax.models as "segnet".
"""
from typing import Any, Dict, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.errors import ConfigError
from segjax.models.backbones.vgg import VGG, WIDTHS
from segjax.models.layers import ConvBNAct
from segjax.ops import max_unpool

Array = jax.Array
Dtype = Any

VGG16_STAGES = (2, 2, 3, 3, 3)


def decoder_widths(widths: Sequence[int], stage_sizes: Sequence[int],
                   last_stage_convs: int) -> Dict[int, tuple]:
  """Output widths of each decoder stage's convs, mirroring the encoder.

  Stage s (5..1) has as many convs as the encoder stage, all widths[s] but
  the last, which steps down to widths[s - 1]; stage 1 has
  `last_stage_convs` convs of widths[0] (SegNet: 1, then its classifier;
  DeconvNet: 2).
  """
  out = {}
  for s in range(len(widths), 1, -1):
    n = stage_sizes[s - 1]
    out[s] = (widths[s - 1],) * (n - 1) + (widths[s - 2],)
  out[1] = (widths[0],) * last_stage_convs
  return out


def pad_to_multiple(images: Array, multiple: int, minimum: int = 0) -> Array:
  """Zero-pads [N, H, W, C] at the bottom/right to a multiple (>= minimum).

  Zeros are the mean colour of normalised images.
  """
  _, h, w, _ = images.shape
  target = [max(minimum, -(-size // multiple) * multiple) for size in (h, w)]
  if target == [h, w]:
    return images
  return jnp.pad(images, [(0, 0), (0, target[0] - h), (0, target[1] - w),
                          (0, 0)])


class UnpoolDecoder(nn.Module):
  """Max unpooling with the encoder's switches + 3x3 conv/BN/ReLU stages.

  Attributes:
    widths: encoder stage widths (the decoder mirrors them).
    stage_sizes: encoder convs per stage (VGG-16's (2, 2, 3, 3, 3)).
    last_stage_convs: convs of decoder stage 1.
    name_format: conv names, formatted with stage s and index i: SegNet's
      "conv{s}_{i}_D", DeconvNet's "deconv{s}_{i}".
    count_down: number a stage's convs n..1 (SegNet's Caffe names mirror
      the encoder: conv5_3_D comes first) instead of 1..n (DeconvNet).
    dtype: compute dtype.
    bn_axis_name: pmap axis name for BatchNorm statistics.
  """
  widths: Sequence[int] = WIDTHS
  stage_sizes: Sequence[int] = VGG16_STAGES
  last_stage_convs: int = 1
  name_format: str = "conv{s}_{i}_D"
  count_down: bool = True
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: Array, encoder: Dict[str, Array],
               train: bool = False) -> Array:
    """Decodes.

    Args:
      x: [N, h5, w5, C] the deepest map (pool5 or what replaces it).
      encoder: VGG(return_indices=True)'s outputs: "indices{s}" the switches
        of pooling s, "conv{s}" the map it pooled (its size).
      train: BatchNorm mode.

    Returns:
      [N, H, W, widths[0]] at the size of encoder["conv1"].
    """
    plan = decoder_widths(self.widths, self.stage_sizes, self.last_stage_convs)
    for s in range(5, 0, -1):
      # PyTorch's max_unpool2d(output_size=...): the pre-pooling size.
      x = max_unpool(x, encoder[f"indices{s}"], encoder[f"conv{s}"].shape)
      for j, width in enumerate(plan[s]):
        i = (self.stage_sizes[s - 1] - j) if self.count_down else j + 1
        x = ConvBNAct(width, (3, 3), dtype=self.dtype,
                      bn_axis_name=self.bn_axis_name,
                      name=self.name_format.format(s=s, i=i))(x, train)
    return x


class SegNet(nn.Module):
  """SegNet with a VGG-16-BN encoder (see the module docstring).

  Attributes:
    num_classes: number of output classes K.
    widths: encoder stage widths (the paper's (64, 128, 256, 512, 512));
      smaller values only make tests fast.
    stage_sizes: encoder convs per stage (VGG-16's (2, 2, 3, 3, 3); fewer
      only make tests compile fast). Decoder stage 1 has one conv fewer.
    classifier_kernel: 3 (the paper's conv1_1_D) or 1.
    dtype: compute dtype; params and BN statistics float32, logits float32.
    bn_axis_name: pmap axis name for synchronised BatchNorm statistics.
  """
  num_classes: int
  widths: Sequence[int] = WIDTHS
  stage_sizes: Sequence[int] = VGG16_STAGES
  classifier_kernel: int = 3
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  def __post_init__(self):
    if self.num_classes < 1:
      raise ConfigError(f"segnet: num_classes must be >= 1, got "
                        f"{self.num_classes}.")
    if self.classifier_kernel not in (1, 3):
      raise ConfigError(f"segnet: classifier_kernel must be 1 or 3, got "
                        f"{self.classifier_kernel}.")
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
    x = pad_to_multiple(images, 32)
    encoder = VGG(tuple(self.stage_sizes), batch_norm=True,
                  widths=tuple(self.widths), return_indices=True,
                  dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                  name="encoder")(x, train)
    x = UnpoolDecoder(tuple(self.widths), tuple(self.stage_sizes),
                      last_stage_convs=self.stage_sizes[0] - 1,
                      dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                      name="decoder")(encoder["pool5"], encoder, train)
    k = self.classifier_kernel
    logits = nn.Conv(self.num_classes, (k, k), dtype=self.dtype,
                     name="conv1_1_D")(x)
    return {"logits": logits[:, :h, :w, :].astype(jnp.float32)}
