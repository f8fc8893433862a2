"""Fully connected CRF with Gaussian edge potentials (Krähenbühl & Koltun 2011).

DeepLab's post-processing. Mean-field inference with a Potts compatibility,
following the reference C++ code (densecrf / pydensecrf) step for step:

  Q = softmax(unary_logits)
  repeat num_iters times:
    Q = softmax(unary_logits + sum_m w_m * D_m^-1/2 K_m D_m^-1/2 Q)

where K_m is the Gaussian kernel exp(-|f_i - f_j|^2 / 2) over the features
f = (x, y) / gaussian_sxy (appearance-free smoothness) and
f = ((x, y) / bilateral_sxy, rgb / bilateral_srgb) (appearance), including
j == i, and D_m = diag(K_m 1) is densecrf's default symmetric normalisation.
The Potts penalty w [l != l'] and densecrf's reward -w [l == l'] differ by a
per-pixel constant, which the softmax removes.

Two paths compute K Q:
  "exact": the explicit N x N kernels, for images up to ~64 x 64.
  "fast":  the Gaussian kernel as an exact separable convolution (truncated
           at 4 sigma), the bilateral one on a bilateral grid (splat with
           5-linear weights onto cells one sigma wide, blur with a 3-tap box
           along each axis so the total variance is one sigma^2, slice).
           The grid replaces densecrf's permutohedral lattice; both are
           approximations of the same Gaussian, and tests measure the error.
Everything is differentiable w.r.t. the unary logits and the compat
weights, so the CRF can be trained end to end (CRF-as-RNN).
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from segjax.errors import ConfigError

EXACT_MAX_PIXELS = 64 * 64


def _features(image, sxy, srgb=None):
  """Per-pixel kernel features [N, H*W, D]: (x, y)/sxy and optionally rgb/srgb."""
  n, h, w = image.shape[:3]
  ys, xs = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32),
                       indexing="ij")
  pos = np.stack([xs, ys], -1).reshape(1, h * w, 2) / np.float32(sxy)
  pos = jnp.broadcast_to(jnp.asarray(pos), (n, h * w, 2))
  if srgb is None:
    return pos
  rgb = image.reshape(n, h * w, 3).astype(jnp.float32) / srgb
  return jnp.concatenate([pos, rgb], -1)


def _exact_filter(feats):
  """Returns q -> D^-1/2 K D^-1/2 q with the dense kernel of feats [N, P, D]."""
  # Position features are constants; keep XLA from folding an N x N matmul
  # at compile time.
  feats = jax.lax.optimization_barrier(feats)
  sq = jnp.sum(feats * feats, -1)
  d2 = sq[:, :, None] + sq[:, None, :] - 2 * jnp.einsum(
      "npd,nqd->npq", feats, feats, precision=jax.lax.Precision.HIGHEST)
  k = jnp.exp(-0.5 * jnp.maximum(d2, 0.0))
  norm = jax.lax.rsqrt(jnp.sum(k, -1) + 1e-20)[..., None]
  return lambda q: norm * jnp.einsum("npq,nqk->npk", k, norm * q,
                                     precision=jax.lax.Precision.HIGHEST)


def _gaussian_taps(sigma):
  r = int(np.ceil(4 * sigma))
  t = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2).astype(np.float32)
  return jnp.asarray(t)


def _separable_gaussian(x, sigma):
  """Zero-padded Gaussian blur of x [N, H, W, K] along H and W (exact taps)."""
  taps = _gaussian_taps(sigma)
  r = (taps.shape[0] - 1) // 2
  n, h, w, k = x.shape
  # Channels become batch so one 1-channel conv kernel serves every label.
  y = x.transpose(0, 3, 1, 2).reshape(n * k, h, w, 1)
  dn = ("NHWC", "HWIO", "NHWC")
  hp = jax.lax.Precision.HIGHEST
  y = jax.lax.conv_general_dilated(y, taps.reshape(-1, 1, 1, 1), (1, 1), ((r, r), (0, 0)),
                                   dimension_numbers=dn, precision=hp)
  y = jax.lax.conv_general_dilated(y, taps.reshape(1, -1, 1, 1), (1, 1), ((0, 0), (r, r)),
                                   dimension_numbers=dn, precision=hp)
  return y.reshape(n, k, h, w).transpose(0, 2, 3, 1)


def _gaussian_filter(n, h, w, sxy):
  """Returns q [N, H*W, K] -> normalised Gaussian (position) message."""
  ones = jnp.ones((1, h, w, 1), jnp.float32)
  norm = jax.lax.rsqrt(_separable_gaussian(ones, sxy) + 1e-20).reshape(1, h * w, 1)

  def apply(q):
    k = q.shape[-1]
    y = _separable_gaussian((norm * q).reshape(n, h, w, k), sxy)
    return norm * y.reshape(n, h * w, k)
  return apply


def _grid_filter(feats, ranges):
  """Bilateral grid: q [N, P, K] -> D^-1/2 K~ D^-1/2 q, K~ ~ exp(-|df|^2 / 2).

  Args:
    feats: [N, P, D] features in units of sigma, each in [0, ranges[d]].
    ranges: static per-dimension maximum of the features.
  """
  n, p, d = feats.shape
  dims = [int(np.floor(r)) + 2 for r in ranges]
  strides = np.cumprod([1] + dims[::-1])[::-1][1:]
  cells = int(np.prod(dims))
  base = jnp.floor(feats)
  frac = feats - base
  base = base.astype(jnp.int32)
  idx, wgt = [], []
  for corner in itertools.product((0, 1), repeat=d):
    c = jnp.asarray(corner, jnp.int32)
    idx.append(jnp.sum((base + c) * jnp.asarray(strides, jnp.int32), -1))
    wgt.append(jnp.prod(jnp.where(c == 1, frac, 1 - frac), -1))
  idx = jnp.stack(idx, -1).reshape(n, -1)                  # [N, P * 2^D]
  wgt = jnp.stack(wgt, -1)                                  # [N, P, 2^D]
  # A 3-tap box per axis has variance 2/3 cell^2; the linear splat and slice
  # add 1/6 each: one sigma^2 in total, as the Gaussian it stands for.
  box = jnp.full((3,), 1.0 / 3.0, jnp.float32)

  def blur(g):
    k = g.shape[-1]
    g = g.reshape((n,) + tuple(dims) + (k,))
    for ax in range(1, d + 1):
      pad = [(0, 0)] * g.ndim
      pad[ax] = (1, 1)
      gp = jnp.pad(g, pad)
      size = g.shape[ax]
      g = sum(box[t] * jax.lax.slice_in_dim(gp, t, t + size, axis=ax) for t in range(3))
    return g.reshape(n, cells, k)

  def raw(q):
    k = q.shape[-1]
    vals = (wgt[..., None] * q[:, :, None, :]).reshape(n, -1, k)
    grid = jax.vmap(lambda v, i: jax.ops.segment_sum(v, i, num_segments=cells))(vals, idx)
    grid = blur(grid)
    got = jnp.take_along_axis(grid, idx[..., None], axis=1).reshape(n, p, -1, k)
    return jnp.sum(got * wgt[..., None], axis=2)

  norm = jax.lax.rsqrt(raw(jnp.ones((n, p, 1), jnp.float32)) + 1e-20)
  return lambda q: norm * raw(norm * q)


def dense_crf(unary_logits: jax.Array, image: jax.Array, num_iters: int = 10,
              gaussian_sxy: float = 3.0, gaussian_compat: float = 3.0,
              bilateral_sxy: float = 80.0, bilateral_srgb: float = 13.0,
              bilateral_compat: float = 10.0, *, method: str = "auto") -> jax.Array:
  """Mean-field inference of a dense CRF (DeepLab's post-processing).

  Args:
    unary_logits: [N, H, W, K] float; the unary energy is -log softmax.
    image: [N, H, W, 3] uint8 (or float in 0..255) RGB image.
    num_iters: mean-field iterations.
    gaussian_sxy, gaussian_compat: smoothness kernel width (pixels) and weight.
    bilateral_sxy, bilateral_srgb, bilateral_compat: appearance kernel
      widths (pixels, colour levels) and weight. Compat weights may be
      traced arrays (learned); the widths are static.
    method: "exact" (N x N kernels), "fast" (convolution + bilateral grid)
      or "auto" (exact up to EXACT_MAX_PIXELS pixels).

  Returns:
    [N, H, W, K] float32 label probabilities.
  """
  if unary_logits.ndim != 4 or image.shape != unary_logits.shape[:3] + (3,):
    raise ConfigError(f"dense_crf wants unary_logits [N, H, W, K] and image [N, H, W, 3]; "
                      f"got {unary_logits.shape} and {image.shape}.")
  for name, v in (("gaussian_sxy", gaussian_sxy), ("bilateral_sxy", bilateral_sxy),
                  ("bilateral_srgb", bilateral_srgb)):
    if not v > 0:
      raise ConfigError(f"{name} must be positive, got {v!r}.")
  n, h, w, k = unary_logits.shape
  if method == "auto":
    method = "exact" if h * w <= EXACT_MAX_PIXELS else "fast"
  if method == "exact":
    smooth = _exact_filter(_features(image, gaussian_sxy))
    appear = _exact_filter(_features(image, bilateral_sxy, bilateral_srgb))
  elif method == "fast":
    smooth = _gaussian_filter(n, h, w, gaussian_sxy)
    feats = _features(jnp.clip(image.astype(jnp.float32), 0, 255), bilateral_sxy,
                      bilateral_srgb)
    ranges = [(w - 1) / bilateral_sxy, (h - 1) / bilateral_sxy] + [255.0 / bilateral_srgb] * 3
    appear = _grid_filter(feats, ranges)
  else:
    raise ConfigError(f"dense_crf method must be 'auto', 'exact' or 'fast', got {method!r}.")
  unary = unary_logits.astype(jnp.float32).reshape(n, h * w, k)

  def step(q, _):
    logits = unary + gaussian_compat * smooth(q) + bilateral_compat * appear(q)
    return jax.nn.softmax(logits, -1), None

  q, _ = jax.lax.scan(step, jax.nn.softmax(unary, -1), None, length=num_iters)
  return q.reshape(n, h, w, k)
