"""Mix Transformer (MiT, Xie et al. 2021): SegFormer's hierarchical encoder.

Four stages; each starts with an *overlapping* patch embedding (a strided
conv whose window is larger than its stride, padded by kernel // 2, then
LayerNorm) and stacks pre-norm transformer blocks:

  x = x + DropPath(EfficientSelfAttention(LayerNorm(x)))
  x = x + DropPath(MixFFN(LayerNorm(x)))

then ends in a LayerNorm. Efficient self-attention shortens the keys and
values by a conv with kernel = stride = sr_ratio (+ LayerNorm), so attention
costs (HW)^2 / sr^2 instead of (HW)^2. Mix-FFN puts a depthwise 3x3 conv
between the two Linear layers (Linear -> dwconv -> GELU -> Linear); its
zero padding leaks position into the features, which is why MiT has no
positional encoding and runs at any input size.

The sizes B0..B5 are data (SIZES): B0 is 32..256 channels wide, B1..B5 share
widths 64..512 and differ in depth. All share heads (1, 2, 5, 8), sr ratios
(8, 4, 2, 1), MLP ratio 4, patches 7/3/3/3 with strides 4/2/2/2.

Numbers follow Hugging Face's `SegformerModel`: every LayerNorm there is
PyTorch's default (eps 1e-5; `config.layer_norm_eps` = 1e-6 is unused), and
the activation is the exact (erf) GELU. The NVlabs original uses eps 1e-6
in the blocks and after each stage: `layer_norm_eps=1e-6` gives that.
Conv arithmetic is PyTorch's (explicit symmetric padding, floor division),
so any H x W gives HF's feature sizes, e.g. 66 x 50 -> 17 x 13 at stride 4.

Param names: `patch_embed{s}/{proj,norm}`, `block{s}_{b}/{norm1, attn/{query,
key, value, sr, sr_norm, proj}, norm2, ffn/{fc1, dwconv, fc2}}`, `norm{s}`;
segjax.convert.huggingface maps HF's state dicts onto them.
"""
import functools
from typing import Any, Dict, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.errors import ConfigError
from segjax.models.remat import maybe_remat
from segjax.models.attention import (IMPLEMENTATIONS, DropPath, attention,
                                     drop_path_rates)

Array = jax.Array
Dtype = Any

# The paper's encoders MiT-B0..B5: widths and blocks per stage.
SIZES = {
    "b0": dict(hidden_sizes=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "b1": dict(hidden_sizes=(64, 128, 320, 512), depths=(2, 2, 2, 2)),
    "b2": dict(hidden_sizes=(64, 128, 320, 512), depths=(3, 4, 6, 3)),
    "b3": dict(hidden_sizes=(64, 128, 320, 512), depths=(3, 4, 18, 3)),
    "b4": dict(hidden_sizes=(64, 128, 320, 512), depths=(3, 8, 27, 3)),
    "b5": dict(hidden_sizes=(64, 128, 320, 512), depths=(3, 6, 40, 3)),
}
DWCONV_IMPLS = ("auto", "shift", "xla")
FEATURES = ("c2", "c3", "c4", "c5")  # strides 4, 8, 16, 32 (ResNet's names)

# The original's init: trunc_normal(0.02) for Linear layers and
# normal(sqrt(2 / fan_out)) for convs, where a depthwise conv's fan_out is
# 3 * 3 * C / C = 9 -- flax's fan_in of a [3, 3, 1, C] kernel.
_dense_init = nn.initializers.truncated_normal(0.02)
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_dwconv_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _layer_norm(eps, dtype, name):
  # Two-pass variance, as PyTorch computes it (the one-pass form loses
  # digits when the mean is large, e.g. right after the patch-embed conv).
  return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False,
                      name=name)


class OverlapPatchEmbed(nn.Module):
  """Conv (kernel > stride, padding kernel // 2) then LayerNorm.

  Attributes:
    features: output channels.
    patch_size, stride: the conv's square window and stride.
    dtype: compute dtype.
  """
  features: int
  patch_size: int
  stride: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [N, H, W, C] -> [N, (H + 2p - k) // s + 1, ..., features], p = k // 2."""
    p = self.patch_size // 2
    x = nn.Conv(self.features, (self.patch_size,) * 2,
                strides=(self.stride,) * 2, padding=((p, p), (p, p)),
                dtype=self.dtype, kernel_init=_conv_init, name="proj")(x)
    # PyTorch's default eps: HF and the original alike use it here.
    return _layer_norm(1e-5, self.dtype, "norm")(x)


class EfficientSelfAttention(nn.Module):
  """Multi-head self-attention whose keys/values are spatially reduced.

  Attributes:
    num_heads: heads; features must divide by it.
    sr_ratio: kernel and stride of the reduction conv (1: no reduction).
    attention_impl: see segjax.models.attention.attention.
    dtype: compute dtype.
  """
  num_heads: int
  sr_ratio: int
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [N, H, W, C] -> [N, H, W, C]."""
    n, h, w, c = x.shape
    head_dim = c // self.num_heads
    dense = functools.partial(nn.Dense, c, dtype=self.dtype,
                              kernel_init=_dense_init)
    q = dense(name="query")(x).reshape(n, h * w, self.num_heads, head_dim)
    kv = x
    if self.sr_ratio > 1:
      r = self.sr_ratio
      # VALID = no padding: PyTorch's floor((H - r) / r) + 1 rows.
      kv = nn.Conv(c, (r, r), strides=(r, r), padding="VALID",
                   dtype=self.dtype, kernel_init=_conv_init, name="sr")(kv)
      kv = _layer_norm(1e-5, self.dtype, "sr_norm")(kv)
    kv = kv.reshape(n, -1, c)
    k = dense(name="key")(kv).reshape(n, -1, self.num_heads, head_dim)
    v = dense(name="value")(kv).reshape(n, -1, self.num_heads, head_dim)
    out = attention(q, k, v, self.attention_impl)  # [N, HW, heads, head_dim]
    return dense(name="proj")(out.reshape(n, h, w, c))


class DepthwiseConv3x3(nn.Module):
  """A 3x3 depthwise conv, padding 1, with bias: nn.Conv(C, (3, 3),
  feature_group_count=C)'s params and function.

  XLA:CPU runs grouped convolutions slowly and differentiates the kernel of
  one as a dense conv (C times the FLOPs): for C = 128 at 128 x 128, batch
  8, the forward took 1.17 s and the kernel gradient 2.45 s (38 GFLOPs),
  against 0.14 s and 0.51 s written as nine shifted multiply-adds, which
  XLA fuses into one loop. `impl`: "shift" (that form), "xla"
  (lax.conv_general_dilated, which cuDNN runs natively) or "auto" (shift on
  CPU, xla elsewhere).

  Attributes:
    features: channels C (in = out).
    impl: "auto", "shift" or "xla".
    dtype: compute dtype.
  """
  features: int
  impl: str = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [N, H, W, C] -> [N, H, W, C]."""
    kernel = self.param("kernel", _dwconv_init, (3, 3, 1, self.features),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,),
                      jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias,
                                              dtype=self.dtype)
    impl = self.impl
    if impl == "auto":
      impl = "shift" if jax.default_backend() == "cpu" else "xla"
    if impl == "xla":
      y = jax.lax.conv_general_dilated(
          x, kernel, (1, 1), ((1, 1), (1, 1)),
          dimension_numbers=("NHWC", "HWIO", "NHWC"),
          feature_group_count=self.features)
    else:
      # Cross-correlation, as nn.Conv and PyTorch: out[h, w] sums
      # kernel[i, j] * x[h + i - 1, w + j - 1].
      h, w = x.shape[1:3]
      padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
      y = sum(padded[:, i:i + h, j:j + w] * kernel[i, j, 0]
              for i in range(3) for j in range(3))
    return y + bias


class MixFFN(nn.Module):
  """Linear -> depthwise 3x3 conv -> GELU (exact) -> Linear.

  Attributes:
    hidden: width of the inner layer (mlp_ratio * C).
    dwconv_impl: see DepthwiseConv3x3.
    dtype: compute dtype.
  """
  hidden: int
  dwconv_impl: str = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [N, H, W, C] -> [N, H, W, C]."""
    c = x.shape[-1]
    x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=_dense_init,
                 name="fc1")(x)
    x = DepthwiseConv3x3(self.hidden, self.dwconv_impl, self.dtype,
                         name="dwconv")(x)
    # HF's "gelu" is torch's erf form; flax's default is the tanh estimate.
    x = nn.gelu(x, approximate=False)
    return nn.Dense(c, dtype=self.dtype, kernel_init=_dense_init,
                    name="fc2")(x)


class MiTBlock(nn.Module):
  """Pre-norm transformer block: attention and Mix-FFN, each residual.

  Attributes:
    num_heads, sr_ratio: of the attention.
    mlp_ratio: Mix-FFN width / C.
    drop_path: stochastic-depth rate of both residual branches.
    layer_norm_eps: of norm1 and norm2.
    attention_impl: see segjax.models.attention.attention.
    dwconv_impl: see DepthwiseConv3x3.
    dtype: compute dtype.
  """
  num_heads: int
  sr_ratio: int
  mlp_ratio: int
  drop_path: float
  layer_norm_eps: float
  attention_impl: str = "auto"
  dwconv_impl: str = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """x: [N, H, W, C] -> [N, H, W, C]."""
    drop = DropPath(self.drop_path)
    y = _layer_norm(self.layer_norm_eps, self.dtype, "norm1")(x)
    y = EfficientSelfAttention(self.num_heads, self.sr_ratio,
                               self.attention_impl, self.dtype,
                               name="attn")(y)
    x = x + drop(y, deterministic=not train)
    y = _layer_norm(self.layer_norm_eps, self.dtype, "norm2")(x)
    y = MixFFN(int(x.shape[-1] * self.mlp_ratio), self.dwconv_impl,
               self.dtype, name="ffn")(y)
    return x + drop(y, deterministic=not train)


class MixTransformer(nn.Module):
  """MiT encoder returning its four stage outputs.

  Attributes:
    hidden_sizes: channels per stage (B0: (32, 64, 160, 256)). The paper's
      encoders have 4 stages; 1 to 4 are accepted (HF's num_encoder_blocks),
      and the per-stage options must all have that length.
    depths: blocks per stage (B0: (2, 2, 2, 2)).
    num_heads: attention heads per stage; hidden_sizes[s] % num_heads[s] == 0.
    sr_ratios: spatial-reduction ratio per stage.
    mlp_ratios: Mix-FFN expansion per stage.
    patch_sizes, strides: patch-embedding conv window and stride per stage.
    drop_path_rate: stochastic depth of the last block; rates rise linearly
      from 0 over all blocks (0.1 in the paper).
    layer_norm_eps: eps of the blocks' and stages' LayerNorms (HF: 1e-5;
      the NVlabs original: 1e-6). Patch-embed and reduction norms use 1e-5.
    attention_impl: "auto", "einsum", "xla" or "cudnn".
    dwconv_impl: Mix-FFN's depthwise conv, "auto", "shift" or "xla" (see
      DepthwiseConv3x3).
    dtype: compute dtype (params stay float32).
    remat: recompute each block's activations in the backward pass instead
      of storing them (segjax.models.remat).
  """
  hidden_sizes: Sequence[int] = SIZES["b0"]["hidden_sizes"]
  depths: Sequence[int] = SIZES["b0"]["depths"]
  num_heads: Sequence[int] = (1, 2, 5, 8)
  sr_ratios: Sequence[int] = (8, 4, 2, 1)
  mlp_ratios: Sequence[int] = (4, 4, 4, 4)
  patch_sizes: Sequence[int] = (7, 3, 3, 3)
  strides: Sequence[int] = (4, 2, 2, 2)
  drop_path_rate: float = 0.1
  layer_norm_eps: float = 1e-5
  attention_impl: str = "auto"
  dwconv_impl: str = "auto"
  dtype: Dtype = jnp.float32
  remat: bool = False

  def __post_init__(self):
    fields = ("hidden_sizes", "depths", "num_heads", "sr_ratios",
              "mlp_ratios", "patch_sizes", "strides")
    lengths = {f: len(getattr(self, f)) for f in fields}
    if len(set(lengths.values())) != 1:
      raise ConfigError(f"mit: per-stage options must have one value per "
                        f"stage; got lengths {lengths}.")
    for s, (c, heads) in enumerate(zip(self.hidden_sizes, self.num_heads)):
      if c % heads:
        raise ConfigError(f"mit: stage {s} has {c} channels, which "
                          f"{heads} heads do not divide; pass num_heads.")
    if not 1 <= len(self.depths) <= len(FEATURES) or min(self.depths) < 1:
      raise ConfigError(f"mit: depths must be 1 to {len(FEATURES)} stages of "
                        f">= 1 blocks, got {tuple(self.depths)}.")
    if self.attention_impl not in IMPLEMENTATIONS:
      raise ConfigError(f"mit: attention_impl must be one of "
                        f"{', '.join(IMPLEMENTATIONS)}, got "
                        f"{self.attention_impl!r}.")
    if self.dwconv_impl not in DWCONV_IMPLS:
      raise ConfigError(f"mit: dwconv_impl must be one of "
                        f"{', '.join(DWCONV_IMPLS)}, got {self.dwconv_impl!r}.")
    super().__post_init__()

  @property
  def channels(self) -> Dict[str, int]:
    """Channels of each returned feature map."""
    return dict(zip(FEATURES, self.hidden_sizes))

  @property
  def feature_strides(self) -> Dict[str, int]:
    """Nominal stride (input pixels per feature pixel) of each feature map."""
    out, total = {}, 1
    for name, stride in zip(FEATURES, self.strides):
      total *= stride
      out[name] = total
    return out

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> Dict[str, Array]:
    """Computes the four stage outputs.

    Args:
      images: [N, H, W, 3] float, normalised.
      train: enable stochastic depth (draws from the "dropout" PRNG stream).

    Returns:
      {"c2": [N, H1, W1, hidden_sizes[0]], "c3", "c4", "c5"} (one per
      stage, in this order) in `dtype`, where H1 = (H - 1) // 4 + 1 for the
      default 7x7/4 patch embedding and each later stage has
      (H_prev - 1) // 2 + 1 rows (PyTorch's sizes).
    """
    rates = drop_path_rates(self.drop_path_rate, self.depths)
    block = maybe_remat(MiTBlock, self.remat, train_arg=True)
    x = images.astype(self.dtype)
    outputs = {}
    for s, name in enumerate(FEATURES[:len(self.depths)]):
      x = OverlapPatchEmbed(self.hidden_sizes[s], self.patch_sizes[s],
                            self.strides[s], self.dtype,
                            name=f"patch_embed{s}")(x)
      for b in range(self.depths[s]):
        x = block(self.num_heads[s], self.sr_ratios[s],
                     self.mlp_ratios[s], rates[s][b], self.layer_norm_eps,
                     self.attention_impl, self.dwconv_impl, self.dtype,
                     name=f"block{s}_{b}")(x, train)
      x = _layer_norm(self.layer_norm_eps, self.dtype, f"norm{s}")(x)
      outputs[name] = x
    return outputs


MiTB0 = functools.partial(MixTransformer, **SIZES["b0"])
MiTB1 = functools.partial(MixTransformer, **SIZES["b1"])
MiTB2 = functools.partial(MixTransformer, **SIZES["b2"])
MiTB3 = functools.partial(MixTransformer, **SIZES["b3"])
MiTB4 = functools.partial(MixTransformer, **SIZES["b4"])
MiTB5 = functools.partial(MixTransformer, **SIZES["b5"])
