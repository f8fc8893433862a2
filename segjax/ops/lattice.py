"""Permutohedral lattice Gaussian filter (Adams, Baek & Davis 2010).

The filter densecrf uses for its kernels: out_i ~ sum_j exp(-|f_i - f_j|^2 / 2) v_j
in O(P d) per value channel instead of O(P^2). Features are scaled as in
densecrf (times sqrt(2/3) (d+1) / sqrt((i+1)(i+2))) and elevated onto the
plane sum(x) = 0 of R^(d+1); each is splatted onto the d+1 vertices of the
lattice simplex that encloses it (barycentric weights), the lattice values
are blurred with a [1/2 1 1/2] kernel along each of the d+1 lattice
directions in turn, and read back (sliced) with the same weights. The
result is the Gaussian up to a constant factor, which callers normalise away.

Everything is static-shape, for jit: `build` deduplicates the lattice points
with one sort per call; `neighbours` finds the blur neighbours by binary
search in the sorted keys; `blur_filter` is the per-iteration splat, blur,
slice. A key is (b, q_0, ..., q_{d-1}, r): the image in the batch, the
quotients by d+1 of the first d integer coordinates (the last follows from
sum(x) = 0) and their common remainder r, which is the index of the vertex
in its simplex; packed into as few int32 words as the static feature ranges
allow (one for DeepLab's settings).

The number of distinct points M is only known at run time, and the blur
costs O(capacity), so callers pick the smallest of `capacities(...)` that
holds M (lax.switch): images use a small part of the colour cube, and M is
typically 0.1 to 2 points per pixel while the static bound is d+1.
"""
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_WORD_MAX = 2 ** 31 - 1   # never a packed key: fills the unused table slots
_HI = jax.lax.Precision.HIGHEST


class Lattice(NamedTuple):
  """The lattice points of a batch of images; L = N * P * (d+1) vertex slots.

  vert: [L] int32 point id of each (image, pixel, simplex vertex): the rank
    of the point's key among the distinct keys.
  bary: [N * P, d+1] float32 barycentric weights (sum to 1 per pixel).
  count: [] int32, the number M of distinct points.
  keys: tuple of [L] int32 words, the distinct keys, sorted (then _WORD_MAX).
  layout: static (quotient offsets, digit sizes, word grouping) of the keys.
  """
  vert: jax.Array
  bary: jax.Array
  count: jax.Array
  keys: tuple
  layout: tuple


def _elevation(d):
  """[d, d+1]: scaled features onto the plane sum(x) = 0 (densecrf's E)."""
  scale = np.sqrt(2.0 / 3.0) * (d + 1) / np.sqrt((np.arange(d) + 1.0) * (np.arange(d) + 2.0))
  e = np.zeros((d, d + 1))
  for i in range(d):
    e[i, :i + 1] = scale[i]
    e[i, i + 1] = -(i + 1) * scale[i]
  return e


def _layout(n, d, ranges):
  """Static key digits: quotient offsets, digit sizes and their int32 words."""
  e = _elevation(d)
  r = np.asarray(ranges, np.float64)[:, None]
  lo, hi = (np.minimum(e, 0) * r).sum(0)[:d], (np.maximum(e, 0) * r).sum(0)[:d]
  # Rounding moves a coordinate by up to (d+1)/2, the wrap onto the plane
  # and the simplex vertex by up to d+1 each, a blur neighbour by d+1 more:
  # 3 quotient steps; one more absorbs float32 error.
  qmin = np.floor(lo / (d + 1)).astype(np.int64) - 4
  sizes = [n] + list(np.floor(hi / (d + 1)).astype(np.int64) + 5 - qmin) + [d + 1]
  words, size = [[]], 1
  for i, s in enumerate(sizes):
    if s >= _WORD_MAX:
      raise ValueError(f"permutohedral lattice: feature ranges too large: {ranges}")
    if size * s >= _WORD_MAX:
      words.append([])
      size = 1
    words[-1].append(i)
    size *= s
  return qmin.astype(np.int32), [int(s) for s in sizes], words


def _pack(digits, sizes, words):
  """digits [..., D] int32 -> tuple of packed int32 words [...]."""
  out = []
  for w in words:
    v = jnp.zeros(digits.shape[:-1], jnp.int32)
    for i in w:
      v = v * sizes[i] + digits[..., i]
    out.append(v)
  return tuple(out)


def _unpack(packed, sizes, words):
  """Inverse of _pack: tuple of words [...] -> digits [..., D] int32."""
  digits = [None] * len(sizes)
  for v, w in zip(packed, words):
    for i in reversed(w):
      digits[i] = v % sizes[i]
      v = v // sizes[i]
  return jnp.stack(digits, -1)


def _lower_bound(table, query):
  """Index of the first table row >= query (lexicographic over the words).

  table: tuple of [S] int32, sorted; query: tuple of [Q] int32.
  """
  if len(table) == 1:
    return jnp.searchsorted(table[0], query[0], side="left").astype(jnp.int32)
  s = table[0].shape[0]

  def halve(_, lo_n):
    lo, n = lo_n          # the answer is in [lo, lo + n]
    half = n // 2
    at = jnp.minimum(lo + half, s - 1)
    less, eq = jnp.zeros(lo.shape, bool), jnp.ones(lo.shape, bool)
    for t, q in zip(table, query):
      less = less | (eq & (t[at] < q))
      eq = eq & (t[at] == q)
    return jnp.where(less, lo + half + 1, lo), jnp.where(less, n - half - 1, half)
  lo = jnp.zeros(query[0].shape, jnp.int32)
  steps = int(np.ceil(np.log2(s + 1))) + 1
  return jax.lax.fori_loop(0, steps, halve, (lo, jnp.full_like(lo, s)))[0]


def build(feats: jax.Array, ranges: Sequence[float]) -> Lattice:
  """Lattice of a batch of feature sets.

  Args:
    feats: [N, P, d] float32 features in units of the kernel's sigma,
      feature i within [0, ranges[i]].
    ranges: static upper bounds of the features (they size the keys).
  """
  n, p, d = feats.shape
  qmin, sizes, words = _layout(n, d, ranges)
  el = jnp.matmul(feats.reshape(n * p, d), jnp.asarray(_elevation(d), jnp.float32),
                  precision=_HI)                                              # [NP, d+1]
  # Nearest remainder-0 point, then the simplex from the order of the residuals.
  rem0 = (d + 1) * jnp.round(el / (d + 1)).astype(jnp.int32)
  res = el - rem0
  i = np.arange(d + 1)
  rank = jnp.sum(jnp.where(i[None, :] < i[:, None], res[:, None, :] >= res[:, :, None],
                           res[:, None, :] > res[:, :, None]), -1, dtype=jnp.int32)
  # Bring the rounded point back onto the plane (coordinates summing to 0).
  rank = rank + jnp.sum(rem0, -1, keepdims=True) // (d + 1)
  rem0 = rem0 + (d + 1) * ((rank < 0).astype(jnp.int32) - (rank > d).astype(jnp.int32))
  rank = jnp.mod(rank, d + 1)
  v = (el - rem0) / (d + 1)
  onehot = jax.nn.one_hot(d - rank, d + 2) - jax.nn.one_hot(d - rank + 1, d + 2)
  b = jnp.einsum("pi,pic->pc", v, onehot, precision=_HI)
  bary = b[:, :d + 1].at[:, 0].add(1.0 + b[:, d + 1])
  # Vertex r: rem0 + r, minus d+1 where rank > d - r; all coordinates = r mod d+1.
  r = np.arange(d + 1)
  key = (rem0[:, None, :d] + r[None, :, None]
         - (d + 1) * (rank[:, None, :d] > (d - r)[None, :, None]).astype(jnp.int32))
  digits = jnp.concatenate([
      jnp.broadcast_to(jnp.repeat(jnp.arange(n, dtype=jnp.int32), p)[:, None, None],
                       (n * p, d + 1, 1)),
      (key - r[None, :, None]) // (d + 1) - qmin,
      jnp.broadcast_to(jnp.asarray(r, jnp.int32)[None, :, None], (n * p, d + 1, 1))], -1)
  slots = n * p * (d + 1)
  packed = _pack(digits.reshape(slots, -1), sizes, words)

  # Deduplicate: sort the keys alone (a 1-word sort is several times faster
  # than one that carries an index along), then look every key up.
  skeys = jax.lax.sort(packed, num_keys=len(packed))
  skeys = skeys if isinstance(skeys, (tuple, list)) else (skeys,)
  start = jnp.zeros(slots, bool).at[0].set(True)
  for k in skeys:
    start = start.at[1:].set(start[1:] | (k[1:] != k[:-1]))
  run = jnp.cumsum(start, dtype=jnp.int32) - 1
  keys = tuple(jnp.full(slots, _WORD_MAX, jnp.int32).at[run].set(k) for k in skeys)
  vert = _lower_bound(keys, packed)
  return Lattice(vert, bary, run[-1] + 1, keys, (qmin, sizes, words))


def capacities(slots: int, smallest: int = 4096, factor: int = 8) -> list:
  """Static blur capacities to choose from, ascending; the last one is `slots`."""
  caps = [slots]
  while caps[0] // factor >= smallest:
    caps.insert(0, caps[0] // factor)
  return caps


def neighbours(lat: Lattice, cap: int) -> jax.Array:
  """Blur neighbours [d+1, 2, cap+1] int32 of the point ids below `cap`.

  Neighbours along direction j: the key minus 1 in every coordinate but j,
  where it is plus d, and the opposite. Id `cap` stands for "absent" (row
  `cap` of the lattice values stays zero). Valid when lat.count <= cap.
  """
  qmin, sizes, words = lat.layout
  d = lat.bary.shape[-1] - 1
  table = tuple(t[:cap] for t in lat.keys)
  ud = _unpack(table, sizes, words)                                      # [cap, d+2]
  batch, q, r = ud[:, :1], ud[:, 1:d + 1], ud[:, d + 1:]
  key = r + (d + 1) * (q + qmin)
  queries = []
  for j in range(d + 1):
    for sign in (-1, 1):
      nkey = key + sign
      if j < d:
        nkey = nkey.at[:, j].add(-sign * (d + 1))
      nr = jnp.mod(r + sign, d + 1)
      queries.append(jnp.concatenate([batch, (nkey - nr) // (d + 1) - qmin, nr], -1))
  queries = jnp.stack(queries).reshape(2 * (d + 1) * cap, d + 2)
  ok = jnp.all((queries >= 0) & (queries < jnp.asarray(sizes, jnp.int32)), -1)
  qwords = _pack(jnp.where(ok[:, None], queries, 0), sizes, words)
  pos = jnp.minimum(_lower_bound(table, qwords), cap - 1)
  for t, w in zip(table, qwords):
    ok = ok & (t[pos] == w)
  # Rows of unused ids hold fill keys: give them no neighbours.
  real = jnp.tile(jnp.arange(cap) < lat.count, 2 * (d + 1))
  ids = jnp.where(ok & real, pos, cap).reshape(d + 1, 2, cap)
  return jnp.concatenate([ids, jnp.full((d + 1, 2, 1), cap, jnp.int32)], -1)


def blur_filter(lat: Lattice, nbrs: jax.Array, values: jax.Array) -> jax.Array:
  """Splat, blur, slice: values [N*P, C] -> [N*P, C], ~ sum_j exp(-|df|^2 / 2) v_j."""
  p, c = values.shape
  d = lat.bary.shape[-1] - 1
  splat = (lat.bary[:, :, None] * values[:, None, :]).reshape(p * (d + 1), c)
  g = jax.ops.segment_sum(splat, lat.vert, num_segments=nbrs.shape[-1])
  # Indices are in range: mode="clip" saves the bounds handling, and lets
  # XLA fuse the gathers into the adds.
  take = lambda a, idx: jnp.take(a, idx, axis=0, mode="clip")
  for j in range(d + 1):
    g = g + 0.5 * (take(g, nbrs[j, 0]) + take(g, nbrs[j, 1]))
  vert = lat.vert.reshape(p, d + 1)
  return sum(lat.bary[:, v:v + 1] * take(g, vert[:, v]) for v in range(d + 1))
