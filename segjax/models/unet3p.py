"""UNet 3+ (Huang et al., ICASSP 2020): full-scale skip connections.

Levels are numbered 0..L here (L = `depth`; the paper's 1..5 for L = 4).
The encoder is the U-Net's: X_En^i = two 3x3 conv + BN + ReLU on the 2x2
max-pooled X_En^{i-1}, width base_width * 2**i (64, ..., 1024 in the paper).
The bottom level is also the first decoder level, X_De^L = X_En^L.

Full-scale skip connections: decoder node X_De^i (i < L) aggregates

  X_En^k, k <= i   (same and finer scales) max-pooled by 2**(i-k),
  X_De^k, k > i    (coarser scales) bilinearly upsampled by 2**(k-i),

each passed through its own 3x3 conv to `cat_channels` (CatChannels, 64 in
the paper) + BN + ReLU, so the concatenation has (L+1) * cat_channels
channels (UpChannels, 320), fused by a 3x3 conv to UpChannels + BN + ReLU.

Full-scale deep supervision: a 3x3 conv head to the classes on every decoder
level X_De^0..X_De^L, bilinearly upsampled to the input. The finest is the
prediction ("logits"); the others are returned in "aux" for a per-level loss.

Classification-guided module (cgm=True): on X_En^L, dropout(0.5) -> 1x1 conv
to 2 -> global max pool gives two-class logits (sigmoid -> P(no object),
P(object)), returned as "cls" for a BCE loss on image-level labels "is any
object in the image". At the same time its argmax gates every head: the
masks of images classified as "no object" are multiplied by 0, as in the
paper's reference code, which removes false positives on organ-free slices.
The gate is a hard 0/1 decision, so no gradient flows from the masks into
the classifier; it learns from the "cls" loss only.

Registered in segjax.models as "unet3p".
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.errors import ConfigError
from segjax.models import layers
from segjax.ops import resize

Array = jax.Array
Dtype = Any


def _upsample(x: Array, factor: int) -> Array:
  """Bilinear (align_corners=False): [N, H, W, C] -> [N, fH, fW, C]."""
  if factor == 1:
    return x
  return resize(x, (x.shape[1] * factor, x.shape[2] * factor))


def _max_pool(x: Array, factor: int) -> Array:
  """Non-overlapping `factor` x `factor` max pooling (the H, W divide)."""
  if factor == 1:
    return x
  return nn.max_pool(x, (factor, factor), strides=(factor, factor))


class UNet3Plus(nn.Module):
  """UNet 3+ for semantic segmentation.

  Attributes:
    num_classes: number of output classes K.
    depth: L, the number of 2x2 poolings (4 in the paper: 5 levels).
    base_width: channels of level 0 (64 in the paper); level i has
      base_width * 2**i.
    cat_channels: channels of each full-scale skip (CatChannels); None means
      base_width, the paper's choice (64).
    norm: "batch" (BatchNorm after every 3x3 conv) or "none".
    deep_supervision: add heads on the decoder levels 1..L (and return them
      as "aux"); without it only the finest level has a head.
    cgm: add the classification-guided module (outputs "cls" and gates the
      masks; see the module docstring). Needs a "dropout" rng when
      train=True.
    cgm_dropout: dropout rate before the CGM's 1x1 conv (0.5 in the paper).
    dtype: compute dtype (bfloat16 on accelerators); params are float32 and
      logits float32.
    bn_axis_name: pmap axis name for synchronised BatchNorm statistics.
  """
  num_classes: int
  depth: int = 4
  base_width: int = 64
  cat_channels: Optional[int] = None
  norm: str = "batch"
  deep_supervision: bool = True
  cgm: bool = False
  cgm_dropout: float = 0.5
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  def __post_init__(self):
    if self.norm not in ("batch", "none"):
      raise ConfigError(f"unet3p: norm={self.norm!r} is not supported; "
                        "choose one of batch, none.")
    if (self.num_classes < 1 or self.depth < 1 or self.base_width < 1
        or (self.cat_channels is not None and self.cat_channels < 1)):
      raise ConfigError(
          f"unet3p: num_classes, depth, base_width and cat_channels must be "
          f">= 1, got {self.num_classes}, {self.depth}, {self.base_width}, "
          f"{self.cat_channels}.")
    if not 0.0 <= self.cgm_dropout < 1.0:
      raise ConfigError(
          f"unet3p: cgm_dropout must be in [0, 1), got {self.cgm_dropout}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> dict:
    """Segments a batch of images.

    Args:
      images: [N, H, W, C] float, normalised; any H, W >= 1.
      train: use batch statistics (and update batch_stats) and dropout.

    Returns:
      {"logits": [N, H, W, K] float32} from the finest decoder level, plus
      "aux": a list of L [N, H, W, K] float32 logits of levels 1..L (finest
      first) when deep_supervision, and "cls": [N, 2] float32 CGM logits
      (no object, object) when cgm. With cgm, "logits" and "aux" are 0 for
      the images whose cls argmax is 0.
    """
    if images.ndim != 4:
      raise ValueError(f"images must be [N, H, W, C], got {images.shape}")
    _, h, w, _ = images.shape
    depth = self.depth
    cat = self.cat_channels or self.base_width
    up_channels = cat * (depth + 1)
    use_norm = self.norm == "batch"
    conv = lambda features, name: layers.ConvBNAct(
        features, (3, 3), use_norm=use_norm, dtype=self.dtype,
        bn_axis_name=self.bn_axis_name, name=name)

    # Every pooling must see an even size; zeros are the mean colour of
    # normalised images. The logits are cropped back.
    scale = 2**depth
    x = images
    if h % scale or w % scale:
      x = jnp.pad(x, [(0, 0), (0, -h % scale), (0, -w % scale), (0, 0)])
    x = x.astype(self.dtype)
    padded = x.shape[1:3]

    enc = []  # level i: [N, H / 2**i, W / 2**i, base_width * 2**i]
    for i in range(depth + 1):
      if i:
        x = _max_pool(x, 2)
      x = layers.DoubleConv(self.base_width * 2**i, "SAME", use_norm, self.dtype,
                      self.bn_axis_name, name=f"enc{i}")(x, train)
      enc.append(x)

    dec = {depth: enc[depth]}  # level i: [N, H / 2**i, W / 2**i, UpChannels]
    for i in reversed(range(depth)):
      parts = [conv(cat, f"dec{i}_from_enc{k}")(_max_pool(enc[k], 2**(i - k)),
                                                train)
               for k in range(i + 1)]
      # The upsampling comes before the conv, as in the paper: the conv then
      # sees (and smooths) the interpolated map at the target scale.
      parts += [conv(cat, f"dec{i}_from_dec{k}")(_upsample(dec[k], 2**(k - i)),
                                                 train)
                for k in range(i + 1, depth + 1)]
      dec[i] = conv(up_channels, f"dec{i}_fuse")(
          jnp.concatenate(parts, axis=-1), train)

    def head(i):
      logits = nn.Conv(self.num_classes, (3, 3), dtype=self.dtype,
                       name=f"head{i}")(dec[i]).astype(jnp.float32)
      # Upsampled at the padded size, so pixel centres stay aligned.
      logits = resize(logits, padded) if i else logits
      return logits[:, :h, :w, :]

    outputs = {"logits": head(0)}
    if self.deep_supervision:
      outputs["aux"] = [head(i) for i in range(1, depth + 1)]

    if self.cgm:
      # (Padding adds less than one bottom cell, so every cell overlaps the
      # image and the global max needs no mask.)
      bottom = nn.Dropout(self.cgm_dropout, deterministic=not train)(
          enc[depth])
      cls = nn.Conv(2, (1, 1), dtype=self.dtype, name="cgm")(bottom)
      cls = jnp.max(cls, axis=(1, 2)).astype(jnp.float32)  # [N, 2]
      # argmax of the sigmoids == argmax of the logits (sigmoid is monotonic).
      gate = (jnp.argmax(cls, axis=-1) == 1).astype(jnp.float32)
      gate = gate[:, None, None, None]
      outputs["logits"] = outputs["logits"] * gate
      if "aux" in outputs:
        outputs["aux"] = [a * gate for a in outputs["aux"]]
      outputs["cls"] = cls
    return outputs
