"""U-Net (Ronneberger, Fischer and Brox, MICCAI 2015).

A contracting path of `depth` levels (two 3x3 convs + ReLU, then 2x2 max
pooling, doubling the width each level), a bottom block, and an expanding path
that upsamples 2x, halves the width, concatenates the skip feature map of the
same level and applies two 3x3 convs; a 1x1 conv gives the class logits.

Two padding modes:

  "same"   padded 3x3 convs (the common modern variant). Any H, W works: the
           input is zero-padded at the bottom/right to a multiple of 2**depth
           and the logits are cropped back.
  "valid"  the paper's unpadded convs, with its overlap-tile strategy: every
           valid conv loses a 1-pixel rim, so the output is smaller than the
           input (388 for 572 at depth 4). To still predict every pixel of the
           image, the image is mirror-padded by `margin` pixels (the context
           the network consumes) plus whatever makes the 2x2 poolings divide
           evenly, and the logits are cropped to the image. The mirrored
           context is what the paper uses at image borders. See
           `valid_unet_sizes`.

Registered in segjax.models as "unet".
"""
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.errors import ConfigError
from segjax.models import layers
from segjax.models.remat import maybe_remat

Array = jax.Array
Dtype = Any


def _valid_output_size(bottom: int, depth: int) -> int:
  """Output size of a valid U-Net whose bottom block sees `bottom` pixels."""
  size = bottom - 4  # the bottom block's two valid 3x3 convs
  for _ in range(depth):
    size = 2 * size - 4  # 2x upsampling, then two valid 3x3 convs
  return size


def valid_unet_sizes(output_size: int, depth: int = 4) -> Tuple[int, int]:
  """Input size a valid-padding U-Net needs to predict `output_size` pixels.

  Per spatial axis. Each level of the contracting path maps a size x to
  (x - 4) / 2, which must be an integer, and the expanding path maps s to
  2s - 4; so a valid U-Net's output is always `2 * margin` smaller than its
  input, with margin = 6 * 2**depth - 4 (92 at depth 4), and only some
  output sizes are reachable (4 mod 2**depth at depth 4: 388, 404, ...).

  Alignment: for an input of `input_size` pixels, output pixel i sits at input
  pixel i + margin. To predict pixels [0, output_size) of an image, pad it by
  `margin` before and `input_size - output_size - margin` (>= margin) after;
  output pixel i then lines up with image pixel i, and output pixels from
  `output_size` on (predictions for the padding) are cropped away.

  Args:
    output_size: number of pixels to predict along the axis (>= 1).
    depth: number of 2x2 poolings.

  Returns:
    (input_size, margin): the smallest input size whose output covers
    `output_size` pixels, and the context consumed on each side. Example:
    valid_unet_sizes(388, 4) == (572, 92), the paper's Figure 1.
  """
  if output_size < 1 or depth < 1:
    raise ConfigError(f"valid_unet_sizes needs output_size >= 1 and depth >= "
                      f"1, got output_size={output_size}, depth={depth}.")
  scale = 2**depth
  margin = 6 * scale - 4
  # _valid_output_size(b) = scale * (b - 4) - 4 * (scale - 1), increasing in b;
  # the bottom block needs at least 5 pixels to output one.
  bottom = max(5, 4 + -(-(output_size + 4 * (scale - 1)) // scale))
  out = _valid_output_size(bottom, depth)
  return out + 2 * margin, margin


def _center_crop(x: Array, height: int, width: int) -> Array:
  """[N, H, W, C] -> [N, height, width, C], cut equally from both sides."""
  top = (x.shape[1] - height) // 2
  left = (x.shape[2] - width) // 2
  return x[:, top:top + height, left:left + width, :]


class UNet(nn.Module):
  """U-Net for semantic segmentation.

  Attributes:
    num_classes: number of output classes K.
    depth: number of 2x2 poolings (4 in the paper).
    base_width: channels of the first level (64 in the paper); level i has
      base_width * 2**i.
    padding: "same" (padded convs) or "valid" (the paper's unpadded convs with
      overlap-tile mirror padding); see the module docstring.
    upsample: "transpose" (the paper's 2x2 up-convolution, computed as a 1x1
      conv + depth-to-space) or "bilinear" (bilinear resize + 1x1 conv).
    norm: "batch" (BatchNorm after every 3x3 conv) or "none" (the paper).
    dropout: dropout rate at the end of the contracting path, on the bottom
      block's output (the paper uses 0.5); needs a "dropout" rng when
      train=True and dropout > 0.
    dtype: compute dtype (bfloat16 on accelerators); params are float32 and
      the logits are returned in float32.
    bn_axis_name: pmap axis name for synchronised BatchNorm statistics.
    remat: recompute each level's double conv in the backward pass instead
      of storing its activations (segjax.models.remat).
  """
  num_classes: int
  depth: int = 4
  base_width: int = 64
  padding: str = "same"
  upsample: str = "transpose"
  norm: str = "batch"
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None
  remat: bool = False

  def __post_init__(self):
    choices = {"padding": ("same", "valid"),
               "upsample": ("transpose", "bilinear"),
               "norm": ("batch", "none")}
    for field, valid in choices.items():
      if getattr(self, field) not in valid:
        raise ConfigError(f"unet: {field}={getattr(self, field)!r} is not "
                          f"supported; choose one of {', '.join(valid)}.")
    if self.num_classes < 1 or self.depth < 1 or self.base_width < 1:
      raise ConfigError(
          f"unet: num_classes, depth and base_width must be >= 1, got "
          f"{self.num_classes}, {self.depth}, {self.base_width}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"unet: dropout must be in [0, 1), got {self.dropout}.")
    super().__post_init__()

  def _pad_input(self, images: Array) -> Array:
    """Pads [N, H, W, C] so the network's output covers every input pixel."""
    _, h, w, _ = images.shape
    if self.padding == "same":
      # Every pooling must see an even size. Zeros are the mean colour of
      # normalised images, and what the padded convs see at borders anyway.
      scale = 2**self.depth
      pads = [(0, -h % scale), (0, -w % scale)]
      mode = "constant"
    else:
      pads = []
      for size in (h, w):
        input_size, margin = valid_unet_sizes(size, self.depth)
        pads.append((margin, input_size - size - margin))
      # The paper's overlap-tile strategy: missing context is mirrored.
      # jnp.pad reflects repeatedly when the margin exceeds the image.
      mode = "reflect"
    if not any(p for pad in pads for p in pad):
      return images
    return jnp.pad(images, [(0, 0), *pads, (0, 0)], mode=mode)

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> dict:
    """Segments a batch of images.

    Args:
      images: [N, H, W, C] float, normalised; any H, W >= 1.
      train: use batch statistics (and update batch_stats) and dropout.

    Returns:
      {"logits": [N, H, W, num_classes] float32}.
    """
    if images.ndim != 4:
      raise ValueError(f"images must be [N, H, W, C], got {images.shape}")
    _, h, w, _ = images.shape
    conv_padding = "SAME" if self.padding == "same" else "VALID"
    double_conv = maybe_remat(layers.DoubleConv, self.remat, train_arg=True)
    block = lambda features, name: double_conv(
        features, conv_padding, self.norm == "batch", self.dtype,
        self.bn_axis_name, name=name)

    x = self._pad_input(images).astype(self.dtype)
    skips = []
    for level in range(self.depth):
      x = block(self.base_width * 2**level, f"down{level}")(x, train)
      skips.append(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = block(self.base_width * 2**self.depth, "bottom")(x, train)
    if self.dropout > 0:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)

    for level in reversed(range(self.depth)):
      features = self.base_width * 2**level
      if self.upsample == "transpose":
        x = layers.ConvTranspose2x(features, dtype=self.dtype,
                                   name=f"upsample{level}")(x)
      else:
        x = layers.BilinearUp2x(features, dtype=self.dtype,
                                name=f"upsample{level}")(x)
      # Valid convs shrink the expanding path more than the skips: the paper
      # crops the skip to the centre (no-op with "same" padding).
      skip = _center_crop(skips[level], x.shape[1], x.shape[2])
      x = jnp.concatenate([skip, x], axis=-1)
      x = block(features, f"up{level}")(x, train)

    logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype,
                     name="head")(x)
    # Both modes put output pixel i at image pixel i; what lies beyond the
    # image predicts the padding.
    logits = logits[:, :h, :w, :].astype(jnp.float32)
    return {"logits": logits}
