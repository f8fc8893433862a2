"""attention() against a naive loop over heads and queries; DropPath's
statistics and its identity at inference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.models import attention as attention_lib


def naive_attention(q, k, v):
  b, lq, h, d = q.shape
  out = np.zeros_like(q)
  for n in range(b):
    for head in range(h):
      for i in range(lq):
        logits = k[n, :, head] @ q[n, i, head] / np.sqrt(d)
        w = np.exp(logits - logits.max())
        out[n, i, head] = (w / w.sum()) @ v[n, :, head]
  return out


@pytest.mark.parametrize("implementation", ["einsum", "xla", "auto"])
def test_attention_matches_loop_with_shorter_keys(implementation):
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, 7, 3, 8)).astype(np.float32)
  k = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
  v = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
  got = jax.jit(lambda *a: attention_lib.attention(*a, implementation))(q, k, v)
  np.testing.assert_allclose(got, naive_attention(q, k, v), rtol=1e-5,
                             atol=1e-5)


def test_attention_bfloat16_keeps_dtype_and_is_close():
  rng = np.random.default_rng(1)
  q, k, v = (rng.normal(size=(1, 16, 2, 16)).astype(np.float32)
             for _ in range(3))
  want = naive_attention(q, k, v)
  for implementation in ("einsum", "xla"):
    got = attention_lib.attention(*(jnp.asarray(a, jnp.bfloat16)
                                    for a in (q, k, v)), implementation)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2)


def test_unknown_implementation_is_refused():
  x = jnp.zeros((1, 2, 1, 4))
  with pytest.raises(ValueError, match="einsum"):
    attention_lib.attention(x, x, x, "flash")


def test_drop_path_drops_whole_samples_and_keeps_the_mean():
  x = jnp.ones((4000, 3, 2))
  layer = attention_lib.DropPath(rate=0.25)
  y = layer.apply({}, x, deterministic=False,
                  rngs={"dropout": jax.random.key(0)})
  per_sample = np.asarray(y).reshape(4000, -1)
  # Each sample is all zeros or all 1 / 0.75.
  assert set(np.unique(per_sample.std(axis=1))) == {0.0}
  np.testing.assert_allclose(np.unique(per_sample), [0.0, 1 / 0.75], rtol=1e-6)
  assert abs(float((per_sample[:, 0] == 0).mean()) - 0.25) < 0.03
  np.testing.assert_array_equal(layer.apply({}, x, deterministic=True), x)


def test_drop_path_rates_rise_linearly_over_all_blocks():
  rates = attention_lib.drop_path_rates(0.1, (2, 3))
  np.testing.assert_allclose(sum(rates, []), np.linspace(0, 0.1, 5))
  assert [len(r) for r in rates] == [2, 3]
