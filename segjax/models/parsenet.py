"""ParseNet (Liu, Rabinovich and Berg, 2015: "Looking Wider to See Better").

Global context added to a fully convolutional net. The trunk is the
DeepLab-LargeFOV VGG-16 (deeplab.py: output stride 8, fc6 a 3x3 conv with
dilation 12, fc7 1x1, 1024 channels), on which ParseNet's VOC model is
built. Then:

  global     average pooling of fc7 over the image ("pool6") -> [N, 1, 1, C]
  normalise  L2 normalisation across channels at every position, of the
             global feature and of the local fc7 features separately, each
             followed by a learned per-channel scale (initialised to 10, as
             the paper's Normalize layers): features of very different
             magnitudes (a global mean vs. local activations) can then be
             combined and still be learned at the same rate
  unpool     the global feature replicated to every position of the local map
  fuse       concatenation [local, global], a 1x1 conv to the classes

The logits are upsampled to the input as DeepLab v1's (pad to 8k + 1,
upsample by exactly 8 with align_corners=True, crop), so any H, W works.
Only the feature pixels that cover the image (not the alignment padding)
enter the global average.

Weights: params["backbone"] is DeepLab v1's trunk; its "features" take
torchvision's vgg16 features (segjax.convert "vgg16"; weights.vgg16_into).

Registered in segjax.models as "parsenet".
"""
from typing import Any, Dict, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.errors import ConfigError
from segjax.models.backbones.vgg import WIDTHS
from segjax.models.deeplab import (VGG16_STAGES, VGGLargeFOVTrunk,
                                   pad_to_8k_plus_1, upsample_by_8)

Array = jax.Array
Dtype = Any


class L2NormScale(nn.Module):
  """L2 normalisation across channels, then a learned per-channel scale.

  y = scale * x / sqrt(max(sum_c x_c**2, eps)), computed in float32.

  Attributes:
    scale_init: initial value of every channel's scale (10 in ParseNet).
    eps: floor of the squared norm (avoids 0/0 for all-zero features).
  """
  scale_init: float = 10.0
  eps: float = 1e-10

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [..., C] -> [..., C] float32."""
    scale = self.param("scale", nn.initializers.constant(self.scale_init),
                       (x.shape[-1],), jnp.float32)
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True),
                                self.eps))
    return x / norm * scale


class ParseNet(nn.Module):
  """ParseNet on the DeepLab-LargeFOV VGG-16 (see the module docstring).

  Attributes:
    num_classes: number of output classes K.
    widths: VGG stage widths (the paper's (64, 128, 256, 512, 512));
      smaller values only make tests fast.
    stage_sizes: convs per VGG stage ((2, 2, 3, 3, 3)).
    fc_width: fc6/fc7 channels (1024).
    fc6_dilation: fc6's atrous rate (12).
    dropout: dropout after fc6 and fc7 (0.5); needs a "dropout" rng when
      train=True.
    norm_scale_init: initial per-channel scale after L2 normalisation (10).
    dtype: compute dtype; params float32, logits float32.
    bn_axis_name: accepted for a uniform model interface; no BatchNorm.
  """
  num_classes: int
  widths: Sequence[int] = WIDTHS
  stage_sizes: Sequence[int] = VGG16_STAGES
  fc_width: int = 1024
  fc6_dilation: int = 12
  dropout: float = 0.5
  norm_scale_init: float = 10.0
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  def __post_init__(self):
    if self.num_classes < 1 or self.fc_width < 1:
      raise ConfigError(f"parsenet: num_classes and fc_width must be >= 1, "
                        f"got {self.num_classes}, {self.fc_width}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"parsenet: dropout must be in [0, 1), got "
                        f"{self.dropout}.")
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
    local = VGGLargeFOVTrunk(
        tuple(self.stage_sizes), tuple(self.widths), self.fc_width,
        self.fc6_dilation, self.dropout, dtype=self.dtype,
        name="backbone")(pad_to_8k_plus_1(images), train)["fc7"]
    # Score pixel i sits on input pixel 8i: these cover the image.
    valid = local[:, :(h - 1) // 8 + 1, :(w - 1) // 8 + 1, :]
    pooled = jnp.mean(valid.astype(jnp.float32), axis=(1, 2), keepdims=True)
    pooled = L2NormScale(self.norm_scale_init, name="pool6_norm")(pooled)
    local = L2NormScale(self.norm_scale_init, name="fc7_norm")(local)
    fused = jnp.concatenate(
        [local, jnp.broadcast_to(pooled, local.shape)], axis=-1)
    scores = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype,
                     name="score")(fused.astype(self.dtype))
    logits = upsample_by_8(scores.astype(jnp.float32))[:, :h, :w, :]
    return {"logits": logits}
