"""Vision Transformer (Dosovitskiy et al., ICLR 2021) as a dense feature extractor.

  vit = ViT(**SIZES["large"], out_indices=(5, 11, 17, 23))
  features = vit.apply(variables, images, train=False)  # 4 x [N, h, w, 1024]

The layout is timm's VisionTransformer, so segjax.convert.timm maps its state
dicts one to one: a 16x16, stride-16 conv `patch_embed`, an optional class
token `cls_token` [1, 1, C], learned absolute position embeddings `pos_embed`
[1, (1 +) gh*gw, C] (the class token's row first), pre-norm blocks
`blocks_{i}` (LayerNorm `norm1` -> multi-head self-attention `attn` with one
fused `qkv` projection and `proj` -> residual; LayerNorm `norm2` -> MLP
`fc1`, exact GELU, `fc2` -> residual), and an optional final LayerNorm `norm`.
LayerNorms use timm's epsilon, 1e-6.

Position embeddings are stored at the pretraining grid (24 x 24 for timm's
vit_*_patch16_384) and resized to the input's grid on every call, the class
token's row kept aside: bicubic with half-pixel centres (PyTorch's
align_corners=False, antialias=False), as mmseg's ViT resizes them (SETR's
reference implementation) and timm's `resample_abs_pos_embed(...,
antialias=False)`; with `pos_embed_antialias=True` PyTorch's antialiased
bicubic instead, which is what timm's `dynamic_img_size=True` models and its
current checkpoint filter compute (`resample_abs_pos_embed` defaults to
antialias=True). The two differ even when upsampling: the antialiased kernel
uses a = -0.5 and renormalises at the borders, the plain one a = -0.75 with
clamped indices.

Inputs of any size are padded at the bottom and right with zeros to a
multiple of the patch size (mmseg's "corner" padding), so the grid is
ceil(H / 16) x ceil(W / 16) and the features cover the padded image; callers
crop (SETR crops its logits back to the input).
"""
import functools
from typing import Any, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segjax.errors import ConfigError
from segjax.models.remat import maybe_remat
from segjax.models.attention import DropPath, attention, drop_path_rates
from segjax.ops.resize import linear_indices

Array = jax.Array
Dtype = Any

# timm's vit_{base,large}_patch16_384 (the ViT paper's B/16 and L/16).
SIZES = {
    "base": dict(width=768, depth=12, num_heads=12),
    "large": dict(width=1024, depth=24, num_heads=16),
}
PRETRAIN_GRID = (24, 24)  # 384 / 16
LN_EPSILON = 1e-6  # timm's and mmseg's ViT LayerNorms (torch's default is 1e-5)
INTERPOLATIONS = ("bicubic", "bilinear")

_dense_init = nn.initializers.truncated_normal(0.02)  # timm's Linear init


# --- position-embedding resizing (static interpolation matrices) -------------


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter a, at distances x."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def interpolation_matrix(in_size: int, out_size: int, method: str = "bicubic",
                         antialias: bool = False) -> np.ndarray:
  """[out_size, in_size] float64 weights of PyTorch's 1-D interpolation.

  `F.interpolate(mode=method, align_corners=False, antialias=antialias)` on
  one axis is `matrix @ x`. Shapes are static, so the weights are computed
  once in numpy and the model only sees two small matmuls.

  bicubic: source position s = (i + 0.5) * in / out - 0.5, taps floor(s) - 1
    .. floor(s) + 2 with a = -0.75, indices clamped to the edge
    (ATen's upsample_bicubic2d).
  bicubic, antialias: PIL's filter (ATen's _upsample_bicubic2d_aa): a = -0.5,
    support 2 * max(in / out, 1) around the centre (i + 0.5) * in / out, taps
    outside the input dropped and the weights renormalised.
  bilinear: ATen's upsample_bilinear2d (segjax.ops.resize's indices).
  """
  if method not in INTERPOLATIONS:
    raise ConfigError(f"position-embedding interpolation {method!r} is not one "
                      f"of {', '.join(INTERPOLATIONS)}.")
  m = np.zeros((out_size, in_size))
  rows = np.arange(out_size)
  scale = in_size / out_size
  if method == "bilinear":
    if antialias:
      raise ConfigError("pos_embed_antialias applies to bicubic interpolation "
                        "only.")
    i0, i1, w0, w1 = linear_indices(in_size, out_size, align_corners=False)
    np.add.at(m, (rows, i0), w0)
    np.add.at(m, (rows, i1), w1)
  elif antialias:
    support = 2.0 * max(scale, 1.0)
    inv = 1.0 / max(scale, 1.0)
    for i in rows:
      centre = scale * (i + 0.5)
      # int() truncates toward zero, as ATen's int64 cast does.
      lo = max(int(centre - support + 0.5), 0)
      hi = min(int(centre + support + 0.5), in_size)
      taps = np.arange(lo, hi)
      w = _cubic((taps - centre + 0.5) * inv, -0.5)
      m[i, taps] = w / w.sum()
  else:
    src = scale * (rows + 0.5) - 0.5  # not clamped at 0 for cubic, as ATen
    base = np.floor(src).astype(np.int64)
    t = src - base
    for k in range(-1, 3):
      np.add.at(m, (rows, np.clip(base + k, 0, in_size - 1)), _cubic(t - k, -0.75))
  return m


def resize_pos_embed(grid_embed: Array, old_grid: Tuple[int, int],
                     new_grid: Tuple[int, int], method: str = "bicubic",
                     antialias: bool = False) -> Array:
  """Resizes patch position embeddings to another grid.

  Args:
    grid_embed: [gh * gw, C], row-major over the (gh, gw) = old_grid grid
      (the class token's row excluded).
    old_grid, new_grid: (rows, cols) of the patch grids.
    method, antialias: see `interpolation_matrix`.

  Returns:
    [h * w, C] for (h, w) = new_grid, in float32; the input itself if the
    grids are equal.
  """
  (gh, gw), (h, w) = tuple(old_grid), tuple(new_grid)
  if (gh, gw) == (h, w):
    return grid_embed
  mh = jnp.asarray(interpolation_matrix(gh, h, method, antialias), jnp.float32)
  mw = jnp.asarray(interpolation_matrix(gw, w, method, antialias), jnp.float32)
  grid = grid_embed.astype(jnp.float32).reshape(gh, gw, -1)
  out = jnp.einsum("ij,jkc,lk->ilc", mh, grid, mw,
                   precision=jax.lax.Precision.HIGHEST)
  return out.reshape(h * w, -1)


# --- the transformer ---------------------------------------------------------


class SelfAttention(nn.Module):
  """Multi-head self-attention with one fused qkv projection (timm's Attention).

  The qkv output's 3 * C channels are laid out (3, heads, head_dim), as
  timm's reshape reads them, so converted weights need no permutation.
  """
  num_heads: int
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [N, L, C] -> [N, L, C]."""
    n, length, c = x.shape
    if c % self.num_heads:
      raise ConfigError(f"ViT width {c} is not divisible by num_heads="
                        f"{self.num_heads}.")
    qkv = nn.Dense(3 * c, dtype=self.dtype, kernel_init=_dense_init,
                   name="qkv")(x)
    qkv = qkv.reshape(n, length, 3, self.num_heads, c // self.num_heads)
    y = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.attention_impl)
    return nn.Dense(c, dtype=self.dtype, kernel_init=_dense_init,
                    name="proj")(y.reshape(n, length, c))


class Mlp(nn.Module):
  """fc1 -> GELU (exact, erf form, as torch.nn.GELU) -> fc2."""
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [N, L, C] -> [N, L, C]."""
    c = x.shape[-1]
    x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=_dense_init,
                 name="fc1")(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(c, dtype=self.dtype, kernel_init=_dense_init,
                    name="fc2")(x)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)),
  each residual branch with stochastic depth."""
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """x: [N, L, C] -> [N, L, C]."""
    c = x.shape[-1]
    y = nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype, name="norm1")(x)
    y = SelfAttention(self.num_heads, self.attention_impl, self.dtype,
                      name="attn")(y)
    x = x + DropPath(self.drop_path)(y, deterministic=not train)
    y = nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype, name="norm2")(x)
    y = Mlp(int(c * self.mlp_ratio), self.dtype, name="mlp")(y)
    return x + DropPath(self.drop_path)(y, deterministic=not train)


class ViT(nn.Module):
  """Patch embedding + position embeddings + `depth` pre-norm blocks.

  Attributes:
    width: embedding channels C (768 ViT-B, 1024 ViT-L).
    depth: number of blocks (12 ViT-B, 24 ViT-L).
    num_heads: attention heads (12 ViT-B, 16 ViT-L).
    mlp_ratio: MLP hidden channels / C.
    patch_size: side of the square patches (and the conv's stride).
    pretrain_grid: (rows, cols) of the stored position embeddings.
    class_token: prepend a learned class token (its outputs are dropped from
      the returned features). SETR-MLA runs without one, as mmseg does.
    out_indices: 0-based indices of the blocks whose outputs are returned,
      in this order; negative counts from the end. None: the last block.
    final_norm: apply the final LayerNorm `norm` to every returned output
      (timm's `get_intermediate_layers(norm=True)`); without it the model
      has no `norm` params.
    drop_path_rate: stochastic depth of the last block; rates rise linearly
      from 0 over the blocks.
    pos_embed_interpolation: "bicubic" (default) or "bilinear".
    pos_embed_antialias: PyTorch's antialiased bicubic (timm's dynamic
      image size, timm's checkpoint filter) instead of the plain one (mmseg).
    attention_impl: segjax.models.attention.attention's implementation.
    dtype: compute dtype; params stay float32, position embeddings are
      resized in float32.
    remat: recompute each block's activations in the backward pass instead
      of storing them (segjax.models.remat).
  """
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  patch_size: int = 16
  pretrain_grid: Tuple[int, int] = PRETRAIN_GRID
  class_token: bool = True
  out_indices: Optional[Sequence[int]] = None
  final_norm: bool = False
  drop_path_rate: float = 0.0
  pos_embed_interpolation: str = "bicubic"
  pos_embed_antialias: bool = False
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  remat: bool = False

  def __post_init__(self):
    # Lists (e.g. from a config.json) would make the module unhashable.
    for name in ("pretrain_grid", "out_indices"):
      if getattr(self, name) is not None:
        object.__setattr__(self, name, tuple(getattr(self, name)))
    super().__post_init__()

  def indices(self) -> Tuple[int, ...]:
    """out_indices as non-negative block indices."""
    wanted = (-1,) if self.out_indices is None else tuple(self.out_indices)
    bad = [i for i in wanted if not -self.depth <= i < self.depth]
    if bad or not wanted:
      raise ConfigError(f"ViT out_indices {wanted} must name blocks 0.."
                        f"{self.depth - 1} (or negative from the end).")
    return tuple(i % self.depth for i in wanted)

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> List[Array]:
    """images: [N, H, W, 3] -> the out_indices blocks' outputs, each
    [N, ceil(H / p), ceil(W / p), width] in `dtype` (p = patch_size)."""
    indices = self.indices()
    n, h, w, _ = images.shape
    p = self.patch_size
    gh, gw = -(-h // p), -(-w // p)
    images = jnp.pad(images, ((0, 0), (0, gh * p - h), (0, gw * p - w), (0, 0)))
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID",
                dtype=self.dtype, name="patch_embed")(images)
    x = x.reshape(n, gh * gw, self.width)

    prefix = int(self.class_token)
    stored = tuple(self.pretrain_grid)
    pos = self.param("pos_embed", nn.initializers.truncated_normal(0.02),
                     (1, prefix + stored[0] * stored[1], self.width),
                     jnp.float32)[0]
    grid_pos = resize_pos_embed(pos[prefix:], stored, (gh, gw),
                                self.pos_embed_interpolation,
                                self.pos_embed_antialias)
    if self.class_token:
      cls = self.param("cls_token", nn.initializers.normal(1e-6),
                       (1, 1, self.width), jnp.float32)
      x = jnp.concatenate(
          [jnp.broadcast_to(cls, (n, 1, self.width)).astype(x.dtype), x], 1)
      grid_pos = jnp.concatenate([pos[:1], grid_pos], 0)
    x = (x + grid_pos[None]).astype(self.dtype)

    rates = drop_path_rates(self.drop_path_rate, [self.depth])[0]
    block = maybe_remat(Block, self.remat, train_arg=True)
    outputs = {}
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_ratio, rates[i], self.attention_impl,
                self.dtype, name=f"blocks_{i}")(x, train)
      if i in indices:
        outputs[i] = x
    norm = (nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype, name="norm")
            if self.final_norm else (lambda y: y))
    return [norm(outputs[i])[:, prefix:].reshape(n, gh, gw, self.width)
            for i in indices]


ViTBase = functools.partial(ViT, **SIZES["base"])
ViTLarge = functools.partial(ViT, **SIZES["large"])
