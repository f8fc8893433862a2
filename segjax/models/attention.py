"""Attention and stochastic depth, shared by the transformer models.

  out = attention(q, k, v, implementation="auto")   # q [B, Lq, H, D]
  x = x + DropPath(rate)(branch(x), deterministic=not train)

`attention` goes through `jax.nn.dot_product_attention`, which on GPUs can use
cuDNN's fused flash attention, or a plain einsum path that any backend (and a
reader) can follow. Both compute the logits and the softmax in float32 and
cast the weights back to the compute dtype, so bfloat16 models stay stable.
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "einsum")


def _einsum_attention(q: Array, k: Array, v: Array) -> Array:
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                      preferred_element_type=jnp.float32) * scale
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def attention(q: Array, k: Array, v: Array,
              implementation: str = "auto") -> Array:
  """softmax(q k^T / sqrt(D)) v for every head.

  Args:
    q: [B, Lq, H, D] queries.
    k, v: [B, Lk, H, D] keys and values (Lk may differ from Lq, e.g. after
      SegFormer's spatial reduction).
    implementation: "einsum" (plain jax.numpy), "xla" or "cudnn" (the
      `jax.nn.dot_product_attention` backends), or "auto": cuDNN flash
      attention on a GPU for bfloat16/float16 inputs when cuDNN supports the
      shape, else "xla".

  Returns:
    [B, Lq, H, D] in q's dtype.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is not one "
                     f"of {', '.join(IMPLEMENTATIONS)}")
  if implementation == "einsum":
    return _einsum_attention(q, k, v)
  if implementation == "auto":
    if (jax.default_backend() == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)):
      try:
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
      except (NotImplementedError, ValueError, RuntimeError):
        pass  # a head size or length cuDNN does not take: use XLA's form
    implementation = "xla"
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


class DropPath(nn.Module):
  """Stochastic depth (Huang et al. 2016): drops a residual branch per sample.

  In training each sample's branch is zeroed with probability `rate` and the
  survivors are scaled by 1 / (1 - rate), so the expectation is unchanged;
  at inference it is the identity. Draws from the "dropout" PRNG stream.
  """
  rate: float = 0.0

  @nn.compact
  def __call__(self, x: Array, deterministic: bool,
               rng: Optional[Array] = None) -> Array:
    """x: [N, ...] a residual branch's output; the same shape back."""
    if deterministic or self.rate == 0.0:
      return x
    if rng is None:
      rng = self.make_rng("dropout")
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(rng, keep, shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


def drop_path_rates(max_rate: float, depths) -> list:
  """Per-block stochastic-depth rates rising linearly from 0 to `max_rate`
  over all blocks of all stages (the ViT/MiT schedule); one list per stage."""
  total = sum(depths)
  rates = [max_rate * i / max(total - 1, 1) for i in range(total)]
  out, start = [], 0
  for depth in depths:
    out.append(rates[start:start + depth])
    start += depth
  return out
