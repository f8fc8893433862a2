"""SegFormer (Xie et al., NeurIPS 2021): a MiT encoder and an all-MLP decoder.

  model = segjax.models.build("segformer_b2", num_classes=150)
  logits = model.apply(variables, images, train=False)["logits"]  # [N, H, W, K]

The decoder (SegFormer's "All-MLP" head) is all 1x1 operations:

  for each stage i:  e_i = Linear_i(c_i) to `decoder_width` channels,
                     upsampled bilinearly (align_corners=False) to stage 1's size
  y = Conv1x1(concat(e_3, e_2, e_1, e_0)) (no bias) -> BatchNorm -> ReLU
  logits = Conv1x1(Dropout(y)), then bilinearly upsampled to the input size

The concatenation is in reverse stage order, as in Hugging Face's
`SegformerDecodeHead`, whose weights segjax.convert.huggingface maps onto
this one to one. HF returns the logits at 1/4 resolution; here they are
upsampled to the input size (the model contract), which equals HF's logits
passed through `F.interpolate(..., size=(H, W), mode="bilinear",
align_corners=False)`.

`decoder_impl="fast"` (the default) computes the same function in another
order. The projection, the upsampling and the fuse conv are all linear, and
bilinear weights sum to 1, so the fuse conv's slice for stage i can be folded
into Linear_i and applied *before* the upsampling:

  y = sum_i upsample(c_i @ (P_i F_i) + b_i F_i)

This moves the fuse conv (4D x D channels at 1/4 resolution) down to each
stage's own resolution and C_i channels: at 512 x 512 with 150 classes XLA
counts 9.2 instead of 17.7 GFLOPs per image for B0, 51.4 instead of 127.4
for B2. The params are the same; "concat" runs HF's order of operations and
is the reference the fast form is tested against.

Top-level params: "backbone" (MixTransformer) and "decode_head", so a
config's `optimizer.lr_mult = {"decode_head": 10.0}` gives the paper's 10x
head learning rate.
"""
import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.errors import ConfigError
from segjax.models.backbones import mit
from segjax.models.layers import BN_EPSILON, BN_MOMENTUM
from segjax.ops.resize import resize

Array = jax.Array
Dtype = Any

# Decoder width per size (the paper's C: 256 for B0/B1, 768 for B2..B5).
DECODER_WIDTHS = {"b0": 256, "b1": 256, "b2": 768, "b3": 768, "b4": 768,
                  "b5": 768}
DECODER_IMPLS = ("fast", "concat")
# The original's Linear init, as in the encoder.
_dense_init = nn.initializers.truncated_normal(0.02)


class _LinearParams(nn.Module):
  """A linear map's params, nn.Dense's / nn.Conv's layout, returned unapplied
  so the head can combine them before use.

  Attributes:
    shape: kernel shape, e.g. [C_in, C_out] or [1, 1, C_in, C_out].
    use_bias: also a [C_out] bias.
    kernel_init: the kernel's initializer.
  """
  shape: Sequence[int]
  use_bias: bool = True
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self):
    kernel = self.param("kernel", self.kernel_init, tuple(self.shape),
                        jnp.float32)
    bias = (self.param("bias", nn.initializers.zeros, (self.shape[-1],),
                       jnp.float32) if self.use_bias else None)
    return kernel, bias


class AllMLPHead(nn.Module):
  """SegFormer's decoder: per-stage Linear, upsample, fuse, classify.

  Attributes:
    num_classes: output channels K.
    width: decoder channels D.
    dropout: dropout rate before the classifier (0.1).
    impl: "fast" (fuse folded into the projections) or "concat" (HF's
      order); see the module docstring.
    dtype: compute dtype.
    bn_axis_name: pmap axis name for BatchNorm statistics.
  """
  num_classes: int
  width: int = 256
  dropout: float = 0.1
  impl: str = "fast"
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, features: Sequence[Array], train: bool = False) -> Array:
    """features: [N, h_i, w_i, C_i] per stage, largest first ->
    logits [N, h_0, w_0, K] in `dtype`."""
    n_stages, d = len(features), self.width
    size = features[0].shape[1:3]
    projections = [
        _LinearParams((x.shape[-1], d), kernel_init=_dense_init,
                      name=f"linear_c{i}")()
        for i, x in enumerate(features)]
    fuse, _ = _LinearParams((1, 1, n_stages * d, d), use_bias=False,
                            kernel_init=nn.initializers.kaiming_normal(),
                            name="linear_fuse")()
    fuse = fuse[0, 0]  # [n_stages * D, D]
    if self.impl == "concat":
      upsampled = [resize(jnp.dot(x, p.astype(self.dtype))
                          + b.astype(self.dtype), size)
                   for x, (p, b) in zip(features, projections)]
      y = jnp.dot(jnp.concatenate(upsampled[::-1], axis=-1),
                  fuse.astype(self.dtype))
    elif self.impl == "fast":
      y = 0.0
      for i, (x, (p, b)) in enumerate(zip(features, projections)):
        # Stage i's slice of the fuse kernel: the concatenation is reversed.
        f = fuse[(n_stages - 1 - i) * d:(n_stages - i) * d]
        kernel, bias = p @ f, b @ f  # folded in float32
        y = y + resize(jnp.dot(x, kernel.astype(self.dtype))
                       + bias.astype(self.dtype), size)
    else:
      raise ConfigError(f"segformer: decoder_impl must be one of "
                        f"{', '.join(DECODER_IMPLS)}, got {self.impl!r}.")
    y = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                     epsilon=BN_EPSILON, dtype=self.dtype,
                     axis_name=self.bn_axis_name, name="batch_norm")(y)
    y = nn.relu(y)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype,
                   name="classifier")(y)


class SegFormer(nn.Module):
  """MiT encoder + all-MLP decoder; logits at the input resolution.

  Attributes:
    num_classes: output classes K.
    hidden_sizes, depths, num_heads, sr_ratios, mlp_ratios, patch_sizes,
      strides, drop_path_rate, layer_norm_eps, attention_impl, dwconv_impl:
      the encoder's options (backbones.mit.MixTransformer).
    decoder_width: decoder channels (256 for B0/B1, 768 for B2..B5).
    dropout: dropout rate before the classifier (0.1).
    decoder_impl: "fast" or "concat" (see the module docstring).
    dtype: compute dtype; params, BN statistics and logits stay float32.
    bn_axis_name: pmap axis name for BatchNorm statistics.
    remat: recompute the encoder's blocks in the backward pass instead of
      storing their activations (segjax.models.remat).
  """
  num_classes: int
  hidden_sizes: Sequence[int] = mit.SIZES["b0"]["hidden_sizes"]
  depths: Sequence[int] = mit.SIZES["b0"]["depths"]
  num_heads: Sequence[int] = (1, 2, 5, 8)
  sr_ratios: Sequence[int] = (8, 4, 2, 1)
  mlp_ratios: Sequence[int] = (4, 4, 4, 4)
  patch_sizes: Sequence[int] = (7, 3, 3, 3)
  strides: Sequence[int] = (4, 2, 2, 2)
  drop_path_rate: float = 0.1
  layer_norm_eps: float = 1e-5
  attention_impl: str = "auto"
  dwconv_impl: str = "auto"
  decoder_width: int = DECODER_WIDTHS["b0"]
  dropout: float = 0.1
  decoder_impl: str = "fast"
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None
  remat: bool = False

  def __post_init__(self):
    if self.decoder_impl not in DECODER_IMPLS:
      raise ConfigError(f"segformer: decoder_impl must be one of "
                        f"{', '.join(DECODER_IMPLS)}, got "
                        f"{self.decoder_impl!r}.")
    # Builds the encoder once unbound, so its options are checked now.
    mit.MixTransformer(**encoder_options(self), parent=None)
    super().__post_init__()

  @nn.compact
  def __call__(self, images: Array, train: bool = False):
    """images: [N, H, W, 3] float, normalised -> {"logits": [N, H, W, K]
    float32}. In training, stochastic depth and dropout draw from the
    "dropout" PRNG stream and BatchNorm updates "batch_stats"."""
    features = mit.MixTransformer(**encoder_options(self),
                                  name="backbone")(images, train)
    logits = AllMLPHead(self.num_classes, self.decoder_width, self.dropout,
                        self.decoder_impl, self.dtype, self.bn_axis_name,
                        name="decode_head")(
                            list(features.values()), train)
    logits = resize(logits.astype(jnp.float32), images.shape[1:3])
    return {"logits": logits}


_ENCODER_OPTIONS = ("hidden_sizes", "depths", "num_heads", "sr_ratios",
                    "mlp_ratios", "patch_sizes", "strides", "drop_path_rate",
                    "layer_norm_eps", "attention_impl", "dwconv_impl",
                    "dtype", "remat")


def encoder_options(model: SegFormer) -> dict:
  """The options of `model`'s MixTransformer (its params["backbone"])."""
  return {k: getattr(model, k) for k in _ENCODER_OPTIONS}


def _size(size: str):
  return functools.partial(SegFormer, **mit.SIZES[size],
                           decoder_width=DECODER_WIDTHS[size])


SegFormerB0 = _size("b0")
SegFormerB1 = _size("b1")
SegFormerB2 = _size("b2")
SegFormerB3 = _size("b3")
SegFormerB4 = _size("b4")
SegFormerB5 = _size("b5")
