"""max_pool_with_argmax / max_unpool vs numpy loops and PyTorch."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.test_util import check_grads

from conftest import needs
from segjax.errors import ConfigError
from segjax.ops import max_pool_with_argmax, max_unpool

CASES = [(2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 1, 0), ((3, 2), (2, 1), (1, 0))]


def _pair(v):
  return v if isinstance(v, tuple) else (v, v)


def ref_pool(x, window, stride, padding):
  """max_pool2d(return_indices=True) from its definition: first max in row-major order."""
  (kh, kw), (sh, sw), (ph, pw) = _pair(window), _pair(stride), _pair(padding)
  n, h, w, c = x.shape
  oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
  val = np.zeros((n, oh, ow, c), x.dtype)
  idx = np.zeros((n, oh, ow, c), np.int64)
  for b in range(n):
    for ch in range(c):
      for i in range(oh):
        for j in range(ow):
          best, arg = -np.inf, -1
          for a in range(kh):
            for d in range(kw):
              y, xx = i * sh - ph + a, j * sw - pw + d
              if 0 <= y < h and 0 <= xx < w and x[b, y, xx, ch] > best:
                best, arg = x[b, y, xx, ch], y * w + xx
          val[b, i, j, ch], idx[b, i, j, ch] = best, arg
  return val, idx


@pytest.mark.parametrize("window,stride,padding", CASES)
def test_pool_matches_definition(window, stride, padding):
  x = np.random.RandomState(0).randn(2, 7, 6, 3).astype(np.float32)
  x[0, :2, :2, 0] = 1.5  # ties: the first position wins
  val, idx = jax.jit(lambda a: max_pool_with_argmax(a, window, stride, padding))(x)
  want_val, want_idx = ref_pool(x, window, stride, padding)
  np.testing.assert_array_equal(val, want_val)
  np.testing.assert_array_equal(idx, want_idx)


def test_unpool_matches_definition_and_grads_reach_maxima():
  x = np.random.RandomState(1).randn(2, 6, 8, 3).astype(np.float32)
  val, idx = max_pool_with_argmax(x, 2, 2)
  out = np.asarray(jax.jit(lambda v, i: max_unpool(v, i, (6, 8)))(val, idx))
  want = np.zeros_like(x)
  for b in range(2):
    for ch in range(3):
      want[b, :, :, ch].reshape(-1)[np.asarray(idx)[b, :, :, ch].reshape(-1)] = (
          np.asarray(val)[b, :, :, ch].reshape(-1))
  np.testing.assert_array_equal(out, want)
  # Gradients of pool -> unpool flow exactly to the max positions.
  g = jax.grad(lambda a: jnp.sum(max_unpool(*max_pool_with_argmax(a, 2, 2), (6, 8)) ** 2))(x)
  np.testing.assert_allclose(g, 2 * want, atol=1e-6)
  check_grads(lambda v: max_unpool(v, idx, (6, 8)), (val,), order=1,
                            modes=["rev"])


def test_vmap_and_errors():
  x = np.random.RandomState(2).randn(3, 1, 4, 4, 2).astype(np.float32)
  v, i = jax.vmap(lambda a: max_pool_with_argmax(a, 2))(x)
  v0, i0 = max_pool_with_argmax(x[:, 0], 2)
  np.testing.assert_array_equal(v[:, 0], v0)
  np.testing.assert_array_equal(i[:, 0], i0)
  with pytest.raises(ConfigError):
    max_pool_with_argmax(x[0], 2, padding=2)
  with pytest.raises(ConfigError):
    max_unpool(v0, i0[..., :1], (4, 4))


def test_matches_torch():
  torch = needs("torch")
  F = torch.nn.functional
  x = np.random.RandomState(3).randn(2, 9, 7, 4).astype(np.float32)
  xt = torch.from_numpy(x).permute(0, 3, 1, 2)
  pool = jax.jit(max_pool_with_argmax, static_argnums=(1, 2, 3))
  unpool = jax.jit(max_unpool, static_argnums=2)
  for window, stride, padding in CASES:
    tv, ti = F.max_pool2d(xt, window, stride, padding, return_indices=True)
    v, i = pool(x, window, stride, padding)
    np.testing.assert_array_equal(v, tv.permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(i, ti.permute(0, 2, 3, 1).numpy())
    up = F.max_unpool2d(tv, ti, window, stride, padding, output_size=(9, 7))
    np.testing.assert_array_equal(unpool(v, i, (9, 7)), up.permute(0, 2, 3, 1).numpy())
