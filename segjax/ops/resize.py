"""Resizing and upsampling with PyTorch's exact semantics.

Models ported from PyTorch interpolate logits with `F.interpolate`; to give
the same numbers the source index and weights of every output pixel are
computed exactly as PyTorch's CPU kernel does (in float32), statically in
numpy, because shapes are static. The arrays then only see slices, gathers
and multiply-adds: no dense [out, in] interpolation matrix per axis, which is
what `jax.image.resize` builds (benchmarks/bench_ops.py measures the three).

All arrays are NHWC.
"""

import jax
import jax.numpy as jnp
import numpy as np

from segjax.errors import ConfigError
from segjax.ops.pairs import IntPair as Size, pair


def linear_indices(in_size: int, out_size: int, align_corners: bool):
  """PyTorch's source indices and weights for linear interpolation, one axis.

  Mirrors `area_pixel_compute_source_index` and `guard_index_and_lambda` of
  ATen's CPU upsampling kernel, in float32 as ATen computes them.

  Returns:
    i0, i1: [out_size] int32, the two source indices (i1 == i0 at the edge).
    w0, w1: [out_size] float32 weights of i0 and i1.
  """
  dst = np.arange(out_size, dtype=np.float32)
  if align_corners:
    scale = np.float32((in_size - 1) / (out_size - 1)) if out_size > 1 else np.float32(0)
    src = scale * dst
  else:
    scale = np.float32(in_size / out_size)
    src = scale * (dst + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  lam = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
  i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
  return (i0.astype(np.int32), i1.astype(np.int32),
          (np.float32(1) - lam).astype(np.float32), lam)


def nearest_indices(in_size: int, out_size: int):
  """PyTorch mode="nearest" source indices, one axis: [out_size] int32.

  `floor(dst * (in / out))` with the scale in float32 (not "nearest-exact"),
  so e.g. 3 -> 5 picks rows 0, 0, 1, 1, 2.
  """
  if in_size == out_size:
    return np.arange(out_size, dtype=np.int32)
  scale = np.float32(in_size / out_size)
  src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(src, in_size - 1).astype(np.int32)


def _shift(x, axis, offset):
  """x shifted by `offset` along `axis`, edges replicated (clamped indices)."""
  n = x.shape[axis]
  if offset == 0:
    return x
  if offset > 0:
    body = jax.lax.slice_in_dim(x, offset, n, axis=axis)
    edge = jax.lax.slice_in_dim(x, n - 1, n, axis=axis)
    return jnp.concatenate([body] + [edge] * offset, axis=axis)
  body = jax.lax.slice_in_dim(x, 0, n + offset, axis=axis)
  edge = jax.lax.slice_in_dim(x, 0, 1, axis=axis)
  return jnp.concatenate([edge] * (-offset) + [body], axis=axis)


def _phases(i0, i1, w0, w1, in_size, factor):
  """Per-phase (offset, a, b): output row factor*q + r = a x[q+o] + b x[q+o+1].

  Integer upsampling with align_corners=False is periodic, and ATen's edge
  clamping equals replicate-padding, so every phase is two shifted copies of
  the input. The weights are PyTorch's (up to float32 rounding of the source
  index, < 1e-6); the formula is verified against the exact indices on a
  random vector and None is returned if it does not hold.
  """
  q = np.arange(in_size * factor) // factor
  phases = []
  for r in range(factor):
    o = int(i0[r] - q[r]) if r < len(i0) else 0
    # Interior rows give the phase's weights; the first row may be clamped.
    k = r + factor * min(1, in_size - 1)
    if i1[k] == i0[k] + 1:
      o = int(i0[k] - q[k])
    phases.append((o, float(w0[k]), float(w1[k])))
  v = np.random.RandomState(0).randn(in_size)
  exact = w0 * v[i0] + w1 * v[i1]
  approx = np.empty_like(exact)
  for r, (o, a, b) in enumerate(phases):
    qs = q[r::factor]
    approx[r::factor] = (a * v[np.clip(qs + o, 0, in_size - 1)]
                         + b * v[np.clip(qs + o + 1, 0, in_size - 1)])
  if not np.allclose(exact, approx, atol=1e-5):
    return None
  return phases


def _linear_axis(x, axis, out_size, align_corners, impl):
  in_size = x.shape[axis]
  if in_size == out_size:  # identity under both align_corners settings
    return x
  i0, i1, w0, w1 = linear_indices(in_size, out_size, align_corners)
  bshape = [1] * x.ndim
  bshape[axis] = out_size
  if impl == "matmul":
    # The dense form, kept as the benchmark's baseline and a cross-check.
    m = np.zeros((out_size, in_size), np.float32)
    np.add.at(m, (np.arange(out_size), i0), w0)
    np.add.at(m, (np.arange(out_size), i1), w1)
    y = jnp.tensordot(jnp.asarray(m, x.dtype), x, axes=[[1], [axis]],
                      precision=jax.lax.Precision.HIGHEST)
    return jnp.moveaxis(y, 0, axis)
  factor = out_size // in_size
  # "auto" gathers: on XLA:CPU the two-row gather measured ~1.7x faster than
  # the shifted-copy form and ~2.5x faster than the dense matmul
  # (benchmarks/bench_ops.py).
  if impl == "phase" and out_size == factor * in_size and factor > 1:
    phases = _phases(i0, i1, w0, w1, in_size, factor)
    if phases is not None:
      # out[factor*q + r] = a_r * x[q + o_r] + b_r * x[q + o_r + 1]: shifted
      # copies of x, interleaved by a reshape; no gather, no matmul.
      parts = [a * _shift(x, axis, o) + b * _shift(x, axis, o + 1)
               for o, a, b in phases]
      y = jnp.stack(parts, axis=axis + 1)
      shape = list(x.shape)
      shape[axis] = out_size
      return y.reshape(shape)
  x0 = jnp.take(x, jnp.asarray(i0), axis=axis)
  x1 = jnp.take(x, jnp.asarray(i1), axis=axis)
  return (x0 * jnp.asarray(w0, x.dtype).reshape(bshape)
          + x1 * jnp.asarray(w1, x.dtype).reshape(bshape))


def _nearest_axis(x, axis, out_size):
  in_size = x.shape[axis]
  idx = nearest_indices(in_size, out_size)
  factor = out_size // in_size
  if out_size == factor * in_size and np.array_equal(
      idx, np.arange(out_size) // factor):
    return jnp.repeat(x, factor, axis=axis)
  return jnp.take(x, jnp.asarray(idx), axis=axis)


def resize(x: jax.Array, size: Size, method: str = "bilinear",
           align_corners: bool = False, *, impl: str = "auto") -> jax.Array:
  """Resizes like PyTorch `F.interpolate(x, size=size, mode=..., align_corners=...)`.

  Args:
    x: [N, H, W, C] (or [H, W, C]) float array.
    size: output (h, w) or one int for both.
    method: "bilinear" or "nearest" (PyTorch's legacy "nearest", which picks
      floor(dst * in / out), not "nearest-exact").
    align_corners: PyTorch's flag; bilinear only.
    impl: bilinear strategy. "auto" and "gather" read two rows per output
      row with a static gather (fastest measured on CPU); "phase" builds
      integer-factor upsampling from shifted copies; "matmul" uses dense
      interpolation matrices (jax.image.resize's approach), for benchmarks.

  Returns:
    [N, h, w, C] (or [h, w, C]) with x's dtype.
  """
  oh, ow = pair(size, "size")
  if oh <= 0 or ow <= 0:
    raise ConfigError(f"resize size must be positive, got {(oh, ow)}.")
  if x.ndim not in (3, 4):
    raise ConfigError(f"resize expects [N, H, W, C] or [H, W, C], got shape {x.shape}.")
  if impl not in ("auto", "gather", "phase", "matmul"):
    raise ConfigError(f"impl must be auto, gather, phase or matmul, got {impl!r}.")
  h_axis = x.ndim - 3
  if method == "bilinear":
    x = _linear_axis(x, h_axis, oh, align_corners, impl)
    return _linear_axis(x, h_axis + 1, ow, align_corners, impl)
  if method == "nearest":
    if align_corners:
      raise ConfigError("align_corners only applies to method='bilinear'; "
                        "PyTorch rejects it for 'nearest' too.")
    x = _nearest_axis(x, h_axis, oh)
    return _nearest_axis(x, h_axis + 1, ow)
  raise ConfigError(f"resize method must be 'bilinear' or 'nearest', got {method!r}.")


def bed_of_nails(x: jax.Array, factor: int) -> jax.Array:
  """Upsamples by placing each value at the top-left of its factor x factor block.

  Args:
    x: [N, H, W, C].
    factor: integer upsampling factor >= 1.

  Returns:
    [N, H * factor, W * factor, C], zeros except at rows and columns that
    are multiples of `factor`.
  """
  if int(factor) != factor or factor < 1:
    raise ConfigError(f"bed_of_nails factor must be a positive int, got {factor!r}.")
  n, h, w, c = x.shape
  y = x[:, :, None, :, None, :]
  y = jnp.pad(y, ((0, 0), (0, 0), (0, factor - 1), (0, 0), (0, factor - 1), (0, 0)))
  return y.reshape(n, h * factor, w * factor, c)


def bilinear_kernel_init(key, shape, dtype=jnp.float32):
  """Initialiser making a transposed conv start as bilinear upsampling (FCN).

  The FCN recipe: a (k, k) tent centred in the kernel, with
  factor = ceil(k / 2), on the channel diagonal (input channel i feeds output
  channel i); off-diagonal taps are zero. Usable as a Flax `kernel_init`.

  Args:
    key: unused (deterministic), kept for the initialiser signature.
    shape: (kh, kw, in_channels, out_channels).
    dtype: parameter dtype.

  Returns:
    [kh, kw, in, out] kernel.
  """
  del key
  kh, kw, cin, cout = shape

  def tent(k):
    factor = (k + 1) // 2
    center = factor - 1 if k % 2 == 1 else factor - 0.5
    return 1 - np.abs(np.arange(k) - center) / factor

  filt = np.outer(tent(kh), tent(kw)).astype(np.float32)
  w = np.zeros(shape, np.float32)
  for i in range(min(cin, cout)):
    w[:, :, i, i] = filt
  return jnp.asarray(w, dtype)


def upsample_bilinear_kernel_size(factor: int) -> int:
  """FCN's transposed-conv kernel size for an integer upsampling factor: 2f - f % 2."""
  return 2 * factor - factor % 2


__all__ = [
    "resize", "bed_of_nails", "bilinear_kernel_init", "linear_indices",
    "nearest_indices", "upsample_bilinear_kernel_size",
]
