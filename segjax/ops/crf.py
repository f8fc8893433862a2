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
           at 4 sigma), the bilateral one on a permutohedral lattice as in
           densecrf (segjax/ops/lattice.py): each pixel is splatted onto the
           6 vertices of its lattice simplex, the lattice is blurred with
           [1/2 1 1/2] along its 6 directions, and read back (sliced). The
           lattice is built once per call (one sort); an iteration costs a
           scatter-add and a gather of 6 rows per pixel plus the blur. Its
           kernel is an approximation of the Gaussian (total weight K~ 1 off
           by ~10 % per pixel before normalisation). Measured: against
           "exact" on the 24 x 28 test scene (5 iterations) mean |dQ| 1e-3,
           labels agree on 99.85 %; on 48 x 48 scenes 3e-5 and 100 %;
           against pydensecrf (10 iterations, 48 x 48 and 96 x 112) mean
           |dQ| 3e-6 and 1.5e-6, labels agree on 100 %. One CPU core, K = 21,
           10 iterations (process CPU time): 0.11 s at 128 x 128, 0.44 s at
           256 x 256, 1.5 s at 512 x 512; the bilateral grid it replaced
           took 1.7, 6.4 and ~24.5 s.
           The number of lattice points is only known at run time; the
           mean field runs in a lax.switch branch sized for it, so under
           vmap every branch runs: batch images along N instead.
Everything is differentiable w.r.t. the unary logits and the compat
weights, so the CRF can be trained end to end (CRF-as-RNN).
"""
import jax
import jax.numpy as jnp
import numpy as np

from segjax.errors import ConfigError
from segjax.ops import lattice

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


def _normalised(raw, ones_shape):
  """Symmetric normalisation (densecrf's default): q -> D^-1/2 raw(D^-1/2 q)."""
  norm = jax.lax.rsqrt(raw(jnp.ones(ones_shape, jnp.float32)) + 1e-20)
  return lambda q: norm * raw(norm * q)


def _blur_rows(x, taps):
  """Zero-padded symmetric 1-D filter of x [N, H, W, C] along H; taps [r+1]."""
  r, size = len(taps) - 1, x.shape[1]
  xp = jnp.pad(x, ((0, 0), (r, r), (0, 0), (0, 0)))
  at = lambda t: xp[:, r + t:r + t + size]
  y = taps[0] * at(0)
  for t in range(1, r + 1):
    y = y + taps[t] * (at(-t) + at(t))
  # Keep XLA from fusing this pass into its consumers, which would
  # recompute every tap once per consumer.
  return jax.lax.optimization_barrier(y)


def _separable_gaussian(x, sigma):
  """Zero-padded Gaussian blur of x [N, H, W, C] along H and W, taps to 4 sigma.

  Shifted multiply-adds along the major axis H, which XLA fuses into one
  pass; W is done the same way between two transposes (shifts along W with
  stride C fuse badly). On one CPU core ~15x faster than the batch of
  1-channel convolutions used before, ~8x than a depthwise convolution.
  """
  r = int(np.ceil(4 * sigma))
  taps = np.exp(-0.5 * (np.arange(r + 1) / sigma) ** 2).astype(np.float32)
  x = _blur_rows(x, taps)
  return jnp.swapaxes(_blur_rows(jnp.swapaxes(x, 1, 2), taps), 1, 2)


def _gaussian_filter(h, w, sxy):
  """Returns q [N, H*W, K] -> normalised Gaussian (position) message."""
  def raw(q):
    return _separable_gaussian(q.reshape(q.shape[0], h, w, -1), sxy).reshape(q.shape)
  return _normalised(raw, (1, h * w, 1))


def _lattice_filter(lat, cap, n, p):
  """Returns q [N, P, K] -> normalised bilateral message; needs lat.count <= cap."""
  nbrs = lattice.neighbours(lat, cap)

  def raw(q):
    q = jnp.broadcast_to(q, (n, p, q.shape[-1]))
    return lattice.blur_filter(lat, nbrs, q.reshape(n * p, -1)).reshape(n, p, -1)
  return _normalised(raw, (1, p, 1))


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
    method: "exact" (N x N kernels), "fast" (convolution + permutohedral
      lattice) or "auto" (exact up to EXACT_MAX_PIXELS pixels). Under vmap
      the fast path runs every lattice capacity (see the module docstring);
      pass the images as the batch dimension N instead.

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
  if method not in ("exact", "fast"):
    raise ConfigError(f"dense_crf method must be 'auto', 'exact' or 'fast', got {method!r}.")
  unary = unary_logits.astype(jnp.float32).reshape(n, h * w, k)

  def mean_field(smooth, appear):
    def step(q, _):
      logits = unary + gaussian_compat * smooth(q) + bilateral_compat * appear(q)
      return jax.nn.softmax(logits, -1), None
    q, _ = jax.lax.scan(step, jax.nn.softmax(unary, -1), None, length=num_iters)
    return q.reshape(n, h, w, k)

  if method == "exact":
    return mean_field(_exact_filter(_features(image, gaussian_sxy)),
                      _exact_filter(_features(image, bilateral_sxy, bilateral_srgb)))
  smooth = _gaussian_filter(h, w, gaussian_sxy)
  feats = _features(jnp.clip(image.astype(jnp.float32), 0, 255), bilateral_sxy, bilateral_srgb)
  ranges = [(w - 1) / bilateral_sxy, (h - 1) / bilateral_sxy] + [255.0 / bilateral_srgb] * 3
  lat = lattice.build(feats, ranges)
  # The blur costs O(capacity) per iteration but the number of lattice
  # points is only known at run time (typically 0.1 to 2 per pixel, at most
  # 6): run the mean field with the smallest capacity that holds them.
  caps = lattice.capacities(lat.vert.shape[0])
  branches = [lambda c=c: mean_field(smooth, _lattice_filter(lat, c, n, h * w)) for c in caps]
  return jax.lax.switch(jnp.searchsorted(jnp.asarray(caps), lat.count), branches)
