"""Max pooling that remembers where the maxima were, and its inverse.

SegNet and DeconvNet decoders put each pooled value back where the encoder
found it. PyTorch records that position as a flat index h * W + w within the
(unpadded) H x W plane of each channel; these functions use the same indices,
so indices computed by a PyTorch encoder work here and vice versa.

All arrays are NHWC.
"""
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from segjax.errors import ConfigError
from segjax.ops.pairs import IntPair, pair


def max_pool_with_argmax(x: jax.Array, window: IntPair, stride: IntPair = None,
                         padding: IntPair = 0) -> Tuple[jax.Array, jax.Array]:
  """PyTorch `max_pool2d(x, window, stride, padding, return_indices=True)`.

  Padding is implicit -inf (never selected), the output size is
  floor((H + 2p - k) / s) + 1 (ceil_mode=False), and ties go to the first
  position in row-major window order, as in PyTorch's CPU kernel.

  Args:
    x: [N, H, W, C] float.
    window: pooling window (kh, kw) or int.
    stride: (sh, sw) or int; defaults to the window, like PyTorch.
    padding: (ph, pw) or int, at most half the window.

  Returns:
    pooled: [N, oh, ow, C] with x's dtype; gradients flow only to the
      selected positions.
    indices: [N, oh, ow, C] int32, flat index h * W + w into each input plane.
  """
  kh, kw = pair(window, "window")
  sh, sw = pair(window if stride is None else stride, "stride")
  ph, pw = pair(padding, "padding")
  if x.ndim != 4:
    raise ConfigError(f"max_pool_with_argmax expects [N, H, W, C], got shape {x.shape}.")
  if min(kh, kw, sh, sw) < 1 or ph < 0 or pw < 0:
    raise ConfigError(f"window and stride must be >= 1 and padding >= 0; got "
                      f"window={(kh, kw)}, stride={(sh, sw)}, padding={(ph, pw)}.")
  if 2 * ph > kh or 2 * pw > kw:
    raise ConfigError(f"padding {(ph, pw)} must be at most half the window {(kh, kw)} "
                      f"(PyTorch's rule).")
  n, h, w, c = x.shape
  oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
  if oh < 1 or ow < 1:
    raise ConfigError(f"window {(kh, kw)} is larger than the padded input {(h, w)}.")
  neg = jnp.array(-jnp.inf, x.dtype)
  xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)), constant_values=neg)
  # One strided view per window offset; kh*kw is small (2x2, 3x3) in practice.
  views, flat = [], []
  rows = np.arange(oh) * sh - ph
  cols = np.arange(ow) * sw - pw
  for dy in range(kh):
    for dx in range(kw):
      views.append(jax.lax.slice(
          xp, (0, dy, dx, 0), (n, dy + (oh - 1) * sh + 1, dx + (ow - 1) * sw + 1, c),
          (1, sh, sw, 1)))
      flat.append((rows[:, None] + dy) * w + (cols[None, :] + dx))
  stacked = jnp.stack(views, axis=0)                       # [kh*kw, N, oh, ow, C]
  # argmax returns the first maximum, the tie rule of PyTorch's row-major scan.
  best = jnp.argmax(stacked, axis=0)                       # [N, oh, ow, C]
  pooled = jnp.take_along_axis(stacked, best[None], axis=0)[0]
  flat = jnp.asarray(np.stack(flat, 0), jnp.int32)         # [kh*kw, oh, ow]
  indices = flat[best, jnp.arange(oh)[:, None, None], jnp.arange(ow)[None, :, None]]
  return pooled, indices.astype(jnp.int32)


def max_unpool(pooled: jax.Array, indices: jax.Array,
               output_size: Sequence[int]) -> jax.Array:
  """PyTorch `max_unpool2d(pooled, indices, output_size=...)`.

  Args:
    pooled: [N, h, w, C] values.
    indices: [N, h, w, C] int, flat index into each output H x W plane (as
      returned by `max_pool_with_argmax`).
    output_size: (H, W), or a full (N, H, W, C) shape.

  Returns:
    [N, H, W, C]: zeros except pooled values at their indices. Where two
    values share an index one of them wins (PyTorch leaves this unspecified
    too); indices outside [0, H*W) are dropped, where PyTorch raises (a
    traced index cannot be checked under jit). The gradient w.r.t. pooled
    is the output gradient read back at the indices.
  """
  if pooled.shape != indices.shape or pooled.ndim != 4:
    raise ConfigError(f"pooled and indices must both be [N, h, w, C]; got "
                      f"{pooled.shape} and {indices.shape}.")
  size = tuple(int(s) for s in output_size)
  if len(size) == 4:
    size = size[1:3]
  if len(size) != 2 or min(size) < 1:
    raise ConfigError(f"output_size must be (H, W) or (N, H, W, C), got {output_size!r}.")
  n, h, w, c = pooled.shape
  big_h, big_w = size
  vals = pooled.reshape(n, h * w, c)
  idx = indices.reshape(n, h * w, c).astype(jnp.int32)
  batch = jnp.arange(n)[:, None, None]
  chan = jnp.arange(c)[None, None, :]
  out = jnp.zeros((n, big_h * big_w, c), pooled.dtype)
  out = out.at[batch, idx, chan].set(vals, mode="drop")
  return out.reshape(n, big_h, big_w, c)
