"""ROI Align and ROI Pool with torchvision's exact semantics.

`roi_align` averages, per output bin, a grid of bilinear samples of the
feature map, with torchvision's boundary rules: a sample with y < -1 or
y > H (or likewise x) contributes zero; y <= 0 is moved to 0; y >= H - 1
reads row H - 1. Bilinear weights and the validity test are both products of
a y factor and an x factor, so every box is described by per-axis sample
rows, columns and weights [K, bins, G, 2]; the two implementations differ
only in how they read the features:

  "gather": reads the (bins*G*2)^2 corner values per box with one gather.
  "einsum": turns the per-axis weights into dense [K, bins, H] and
            [K, bins, W] matrices and contracts them with the features: more
            FLOPs, but only matmuls (the MXU path on TPU).

Adaptive sampling (sampling_ratio <= 0) uses ceil(roi_size / output_size)
samples per bin, which depends on the box, and is exact for any box under
jit. Shapes must be static, so there are two static grids, chosen per call
with `lax.cond`: while every box needs at most `max_sampling_ratio` samples
per bin and axis, the grid of that many (masked per box) is read as above;
otherwise each bin's samples are summed into dense per-axis weight matrices
[K, bins, H] and [K, bins, W] (a scatter-add) that are contracted with the
features. Only the samples inside [-1, H] count, and their spacing
bin_size / ceil(bin_size) is over 1/2, so a window of 2H + 5 consecutive
samples starting at the box's first one in range holds them all whatever
the box size. `max_sampling_ratio` thus sets the cost of the fast grid
(growing with its square), not the result.

Boxes are differentiable: the sample positions, hence the bilinear weights,
are smooth in the box coordinates (the number of samples is not).

All feature maps are NHWC; boxes are (x1, y1, x2, y2) in input-image pixels.
"""
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from segjax.errors import ConfigError
from segjax.ops.pairs import IntPair, pair

_HIGHEST = jax.lax.Precision.HIGHEST
# Gathered corner values held at once (elements) before boxes are chunked.
_GATHER_BUDGET = 1 << 25


def _div(a, b):
  """a / b correctly rounded, b a static number.

  XLA rewrites division by a constant into multiplication by its reciprocal,
  one ulp off: enough to move a ceil() (14 / 7 -> 2.0000002 -> 3) and break
  parity with torchvision. Hiding the divisor behind an optimization barrier
  keeps the true division.
  """
  return a / jax.lax.optimization_barrier(jnp.full(a.shape, b, a.dtype))


def _axis_samples(start, length, bins, grid, grid_max, size, size_max, window=False):
  """Per-axis sample rows and weights of every bin.

  Args:
    start, length: [K] float, the ROI's start and extent on the feature map.
    bins: number of output bins along the axis.
    grid: [K] int, samples per bin along the axis (<= 0: none); at most
      grid_max unless `window`.
    grid_max: static number of samples per bin held.
    size: [K] int, feature map extent along the axis (per box, for FPN).
    size_max: static int >= every size.
    window: hold, of each bin's `grid` samples, the grid_max consecutive ones
      from just before the first inside [-1, size] (grid_max = 2 size_max + 5
      holds all of those; see the module docstring).

  Returns:
    idx: [K, bins, grid_max, 2] int32, the low and high rows read.
    wgt: [K, bins, grid_max, 2] float, their bilinear weights, zero for
      samples outside the map or past the box's grid.
  """
  dtype = length.dtype
  bin_size = _div(length, bins)[:, None, None]
  p = jnp.arange(bins, dtype=dtype)[None, :, None]
  i = jnp.arange(grid_max, dtype=dtype)[None, None, :]
  g = jax.lax.optimization_barrier(jnp.maximum(grid, 1).astype(dtype))[:, None, None]
  if window:
    # The first sample at or past -1 is ceil((-1 - bin start) / spacing -
    # 0.5); one earlier absorbs the rounding. Indices carry no gradient.
    lead = jax.lax.stop_gradient((-1.0 - start[:, None, None] - p * bin_size) * g / bin_size)
    i = i + jnp.maximum(jnp.ceil(lead - 0.5) - 1.0, 0.0)
  # torchvision's expression order, so float32 rounding matches.
  pos = start[:, None, None] + p * bin_size + (i + 0.5) * bin_size / g
  size_f = size.astype(dtype)[:, None, None]
  valid = (pos >= -1.0) & (pos <= size_f) & (i < grid[:, None, None])
  # torchvision moves y <= 0 to 0 and reads row H-1 alone once y >= H-1:
  # both are a clip of the position.
  pos = jnp.clip(pos, 0.0, size_f - 1)
  if window:
    # The count below would hold grid_max * size_max values per bin. The
    # barrier keeps XLA from rounding pos differently for the floor and the
    # fraction; an ulp either way then only moves the value by an ulp.
    pos = jax.lax.optimization_barrier(pos)
    low = jnp.floor(pos).astype(jnp.int32)
    high = jnp.minimum(low + 1, size[:, None, None].astype(jnp.int32) - 1)
    frac = pos - low.astype(dtype)
    wgt = jnp.where(valid[..., None], jnp.stack([1.0 - frac, frac], -1), 0.0)
    return jnp.stack([low, high], -1), wgt
  # floor(pos) as a count of the integers 1..H-1 at or below pos. XLA would
  # otherwise recompute pos separately for the rows read and for the
  # weights, rounded differently (with and without FMA); near an integer
  # the two could disagree by a whole row. A reduction is computed once, and
  # the fraction below stays within an ulp of [0, 1] whichever rounding the
  # weights see, so the interpolation stays right.
  steps = jnp.arange(1, max(int(size_max), 2), dtype=dtype)
  low = jnp.sum(pos[..., None] >= steps, axis=-1).astype(jnp.int32)
  high = jnp.minimum(low + 1, size[:, None, None].astype(jnp.int32) - 1)
  frac = pos - low.astype(dtype)
  idx = jnp.stack([low, high], -1)
  wgt = jnp.where(valid[..., None], jnp.stack([1.0 - frac, frac], -1), 0.0)
  return idx, wgt


def _box_geometry(boxes, spatial_scale, output_size, sampling_ratio, aligned,
                  max_sampling_ratio, heights, widths, max_h, max_w, exact=False):
  """Sample rows/cols and weights for all boxes; count folded into y weights.

  Returns (yi, yw, xi, xw) as `_axis_samples` gives them, and `fits`: a bool
  scalar, whether every box's adaptive grid is within max_sampling_ratio
  (always True for a fixed sampling_ratio). With `exact` (adaptive only) the
  grids are the windows that hold every sample in range, for any box.
  """
  oh, ow = output_size
  boxes = boxes.astype(jnp.float32)
  offset = 0.5 if aligned else 0.0
  scaled = boxes * jnp.asarray(spatial_scale, jnp.float32)[..., None] - offset
  x1, y1, x2, y2 = (scaled[:, a] for a in range(4))
  rw, rh = x2 - x1, y2 - y1
  if not aligned:
    # Legacy behaviour: force malformed / tiny ROIs to 1x1.
    rw, rh = jnp.maximum(rw, 1.0), jnp.maximum(rh, 1.0)
  k = boxes.shape[0]
  if sampling_ratio > 0:
    gh = gw = jnp.full((k,), sampling_ratio, jnp.int32)
    gmax_h = gmax_w = sampling_ratio
    fits = jnp.bool_(True)
  else:
    # The sample count is a step function of the box: no gradient through it.
    gh = jnp.ceil(_div(jax.lax.stop_gradient(rh), oh)).astype(jnp.int32)
    gw = jnp.ceil(_div(jax.lax.stop_gradient(rw), ow)).astype(jnp.int32)
    fits = jnp.all((gh <= max_sampling_ratio) & (gw <= max_sampling_ratio))
    gmax_h, gmax_w = ((2 * max_h + 5, 2 * max_w + 5) if exact
                      else (max_sampling_ratio, max_sampling_ratio))
  # float: a huge box's gh * gw may pass the int32 range.
  count = jnp.maximum(gh.astype(jnp.float32) * gw.astype(jnp.float32), 1.0)
  window = exact and sampling_ratio <= 0
  yi, yw = _axis_samples(y1, rh, oh, gh, gmax_h, heights, max_h, window)
  xi, xw = _axis_samples(x1, rw, ow, gw, gmax_w, widths, max_w, window)
  return yi, yw / count[:, None, None, None], xi, xw, fits


def _gather_read(flat, base, width, yi, yw, xi, xw):
  """Weighted corner reads from flat features [R, C] for a chunk of boxes."""
  k = yi.shape[0]
  rows = yi.reshape(k, -1)                                   # [K, P*G*2]
  cols = xi.reshape(k, -1)                                   # [K, Q*G*2]
  idx = base[:, None, None] + rows[:, :, None] * width[:, None, None] + cols[:, None, :]
  vals = flat[idx]                                           # [K, P*G*2, Q*G*2, C]
  vals = vals.reshape(yi.shape + xi.shape[1:] + flat.shape[-1:])
  return jnp.einsum("kpiaqjbc,kpia,kqjb->kpqc", vals, yw.astype(flat.dtype),
                    xw.astype(flat.dtype), precision=_HIGHEST)


def _one_hot_weights(idx, wgt, size, dtype):
  """[K, bins, G, 2] rows and weights -> dense [K, bins, size] (matmuls only)."""
  return jnp.einsum("kpgas,kpga->kps", jax.nn.one_hot(idx, size, dtype=dtype),
                    wgt.astype(dtype))


def _scatter_weights(idx, wgt, size, dtype):
  """The same as `_one_hot_weights` by a scatter-add: for the long windows of
  exact adaptive sampling, whose one-hots would hold G * size values a bin."""
  k, p = idx.shape[:2]
  flat = (jnp.arange(k * p, dtype=jnp.int32)[:, None] * size + idx.reshape(k * p, -1))
  dense = jnp.zeros((k * p * size,), dtype).at[flat.reshape(-1)].add(
      wgt.reshape(-1).astype(dtype))
  return dense.reshape(k, p, size)


def _einsum_read(features, bidx, ay, ax, precision):
  """Reads [K, P, Q, C] over one [N, H, W, C] level with dense per-axis
  weights ay [K, P, H] and ax [K, Q, W]."""
  n = features.shape[0]
  dt = features.dtype
  # The box's image enters as one more one-hot factor, so features are never
  # gathered per box: [K*P, N*H] @ [N*H, W*C].
  ayn = ay[:, :, None, :] * jax.nn.one_hot(bidx, n, dtype=dt)[:, None, :, None]
  t = jnp.einsum("kpnh,nhwc->kpwc", ayn, features, precision=precision)
  return jnp.einsum("kpwc,kqw->kpqc", t, ax, precision=precision)


def _chunked(fn, per_box, k, per_box_elems):
  """fn over boxes in chunks (lax.map) so the intermediates stay under budget."""
  chunk = max(1, min(k, _GATHER_BUDGET // max(per_box_elems, 1)))
  if chunk >= k:
    return fn(*per_box)
  num = -(-k // chunk)
  # Padding boxes read index 0 with zero weight and are dropped after.
  pad = lambda a: jnp.pad(a, [(0, num * chunk - k)] + [(0, 0)] * (a.ndim - 1))
  split = tuple(pad(a).reshape((num, chunk) + a.shape[1:]) for a in per_box)
  out = jax.lax.map(lambda a: fn(*a), split)
  return out.reshape((num * chunk,) + out.shape[2:])[:k]


def _check(features, boxes, box_indices, sampling_ratio, max_sampling_ratio, impl):
  if features.ndim != 4:
    raise ConfigError(f"features must be [N, H, W, C], got shape {features.shape}.")
  if boxes.ndim != 2 or boxes.shape[-1] != 4:
    raise ConfigError(f"boxes must be [K, 4] (x1, y1, x2, y2), got shape {boxes.shape}.")
  if box_indices.shape != boxes.shape[:1]:
    raise ConfigError(f"box_indices must be [K] = {boxes.shape[:1]}, got {box_indices.shape}.")
  if int(sampling_ratio) != sampling_ratio:
    raise ConfigError(f"sampling_ratio must be an int, got {sampling_ratio!r}.")
  if sampling_ratio <= 0 and max_sampling_ratio < 1:
    raise ConfigError(f"max_sampling_ratio must be >= 1, got {max_sampling_ratio}.")
  if impl not in ("gather", "einsum"):
    raise ConfigError(f"impl must be 'gather' or 'einsum', got {impl!r}.")


def roi_align(features: jax.Array, boxes: jax.Array, box_indices: jax.Array,
              output_size: IntPair, spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False, *,
              max_sampling_ratio: int = 4, impl: str = "gather",
              precision=_HIGHEST) -> jax.Array:
  """Equals `torchvision.ops.roi_align` (NHWC in and out).

  Args:
    features: [N, H, W, C] float.
    boxes: [K, 4] float (x1, y1, x2, y2), input-image pixels.
    box_indices: [K] int, the image of each box in [0, N).
    output_size: (oh, ow) or int.
    spatial_scale: feature-map pixels per input pixel (1/stride).
    sampling_ratio: samples per bin and axis; <= 0 means adaptive,
      ceil(roi_size / output_size) per box, exactly (torchvision's).
    aligned: subtract half a pixel from the scaled box (pixel-centre model);
      False keeps the legacy behaviour that forces ROIs to at least 1x1.
    max_sampling_ratio: adaptive sampling reads a fixed grid of this many
      samples per bin and axis while every box needs no more, else dense
      per-axis weights (module docstring): a cost, not an accuracy, knob.
      Ignored when sampling_ratio > 0.
    impl: "gather" or "einsum" (dense one-hot matmuls); equal results.
    precision: matmul precision of the einsum path.

  Returns:
    [K, oh, ow, C] with features' dtype. Differentiable w.r.t. features and
    boxes.
  """
  output_size = pair(output_size, "output_size", minimum=1)
  features, boxes, box_indices = map(jnp.asarray, (features, boxes, box_indices))
  _check(features, boxes, box_indices, sampling_ratio, max_sampling_ratio, impl)
  n, h, w, c = features.shape
  k = boxes.shape[0]
  sizes_h = jnp.full((k,), h, jnp.int32)
  sizes_w = jnp.full((k,), w, jnp.int32)
  geometry = functools.partial(_box_geometry, boxes, spatial_scale, output_size,
                               int(sampling_ratio), aligned, max_sampling_ratio,
                               sizes_h, sizes_w, h, w)
  yi, yw, xi, xw, fits = geometry()
  bidx = box_indices.astype(jnp.int32)
  dt = features.dtype
  dense_elems = output_size[0] * (w * c + n * h)

  def sampled():
    g2 = yi.shape[2] * 2
    if impl == "gather":
      flat = features.reshape(n * h * w, c)
      fn = lambda b, wd, a, bb, cc, d: _gather_read(flat, b, wd, a, bb, cc, d)
      return _chunked(fn, (bidx * (h * w), sizes_w, yi, yw, xi, xw), k,
                      output_size[0] * output_size[1] * g2 * g2 * c)
    fn = lambda b, a, bb, cc, d: _einsum_read(
        features, b, _one_hot_weights(a, bb, h, dt), _one_hot_weights(cc, d, w, dt),
        precision)
    return _chunked(fn, (bidx, yi, yw, xi, xw), k, dense_elems)

  def exact():
    eyi, eyw, exi, exw, _ = geometry(exact=True)
    ay, ax = _scatter_weights(eyi, eyw, h, dt), _scatter_weights(exi, exw, w, dt)
    fn = lambda b, a, x: _einsum_read(features, b, a, x, precision)
    return _chunked(fn, (bidx, ay, ax), k, dense_elems)

  out = sampled() if sampling_ratio > 0 else jax.lax.cond(fits, sampled, exact)
  return out.astype(features.dtype)


def fpn_levels(boxes: jax.Array, k_min: int, k_max: int, canonical_scale: float = 224.0,
               canonical_level: int = 4, eps: float = 1e-6) -> jax.Array:
  """FPN level of each box, k = floor(k0 + log2(sqrt(wh) / 224)), clamped.

  Args:
    boxes: [K, 4] (x1, y1, x2, y2), input-image pixels.
    k_min, k_max: the finest and coarsest pyramid levels (e.g. 2 and 5).

  Returns:
    [K] int32 in [0, k_max - k_min], the index into the list of levels
    (torchvision's LevelMapper, including its eps).
  """
  boxes = jax.lax.stop_gradient(boxes.astype(jnp.float32))
  s = jnp.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
  lvl = jnp.floor(canonical_level + jnp.log2(_div(s, canonical_scale)) + eps)
  return (jnp.clip(lvl, k_min, k_max) - k_min).astype(jnp.int32)


def multilevel_roi_align(features: Sequence[jax.Array], boxes: jax.Array,
                         box_indices: jax.Array, output_size: IntPair,
                         spatial_scales: Sequence[float], sampling_ratio: int = 2,
                         aligned: bool = False, *, canonical_scale: float = 224.0,
                         canonical_level: int = 4, max_sampling_ratio: int = 4,
                         impl: str = "gather", precision=_HIGHEST) -> jax.Array:
  """ROI Align over FPN levels, like torchvision's MultiScaleRoIAlign.

  Each box is pooled from the level `fpn_levels` assigns it, with that
  level's spatial scale.

  Args:
    features: L arrays [N, H_l, W_l, C], finest first.
    boxes: [K, 4] (x1, y1, x2, y2), input-image pixels.
    box_indices: [K] int image index.
    output_size: (oh, ow) or int.
    spatial_scales: L scales, 1 / stride of each level, powers of two.
    sampling_ratio, aligned, max_sampling_ratio, impl, precision: as roi_align.
    canonical_scale, canonical_level: the FPN paper's 224 and 4.

  Returns:
    [K, oh, ow, C].
  """
  output_size = pair(output_size, "output_size", minimum=1)
  if len(features) != len(spatial_scales) or not features:
    raise ConfigError(f"got {len(features)} feature levels but "
                      f"{len(spatial_scales)} spatial_scales.")
  features = [jnp.asarray(f) for f in features]
  boxes, box_indices = jnp.asarray(boxes), jnp.asarray(box_indices)
  levels_log2 = [-math.log2(s) for s in spatial_scales]
  if any(abs(v - round(v)) > 1e-6 for v in levels_log2):
    raise ConfigError(f"spatial_scales must be powers of two, got {spatial_scales}.")
  for f in features:
    _check(f, boxes, box_indices, sampling_ratio, max_sampling_ratio, impl)
  k_min, k_max = int(round(levels_log2[0])), int(round(levels_log2[-1]))
  level = fpn_levels(boxes, k_min, k_max, canonical_scale, canonical_level)
  n, c = features[0].shape[0], features[0].shape[-1]
  k = boxes.shape[0]
  bidx = box_indices.astype(jnp.int32)
  hs = jnp.asarray([f.shape[1] for f in features], jnp.int32)[level]
  ws = jnp.asarray([f.shape[2] for f in features], jnp.int32)[level]
  scale = jnp.asarray(spatial_scales, jnp.float32)[level]
  geometry = functools.partial(_box_geometry, boxes, scale, output_size,
                               int(sampling_ratio), aligned, max_sampling_ratio, hs, ws,
                               max(f.shape[1] for f in features),
                               max(f.shape[2] for f in features))
  yi, yw, xi, xw, fits = geometry()
  dt = features[0].dtype

  def per_level(yi, yw, xi, xw, weights):
    out = 0.0
    for l, f in enumerate(features):
      # Boxes of other levels get zero weights; their indices are clamped
      # into this level's range so the reads stay in bounds.
      on = (level == l).astype(yw.dtype)[:, None, None, None]
      ay = weights(jnp.minimum(yi, f.shape[1] - 1), yw * on, f.shape[1], dt)
      ax = weights(jnp.minimum(xi, f.shape[2] - 1), xw, f.shape[2], dt)
      fn = lambda b, a, x, f=f: _einsum_read(f, b, a, x, precision)
      elems = output_size[0] * (f.shape[2] * c + n * f.shape[1])
      out = out + _chunked(fn, (bidx, ay, ax), k, elems)
    return out

  def sampled():
    if impl == "einsum":
      return per_level(yi, yw, xi, xw, _one_hot_weights)
    # All levels in one flat buffer: each box reads only its own level, so
    # the cost is that of one single-level call.
    g2 = yi.shape[2] * 2
    flat = jnp.concatenate([f.reshape(-1, c) for f in features], axis=0)
    starts = np.cumsum([0] + [f.shape[0] * f.shape[1] * f.shape[2] for f in features])
    base = jnp.asarray(starts[:-1], jnp.int32)[level] + bidx * hs * ws
    fn = lambda b, wd, a, bb, cc, d: _gather_read(flat, b, wd, a, bb, cc, d)
    elems = output_size[0] * output_size[1] * g2 * g2 * c
    return _chunked(fn, (base, ws, yi, yw, xi, xw), k, elems)

  def exact():
    eyi, eyw, exi, exw, _ = geometry(exact=True)
    return per_level(eyi, eyw, exi, exw, _scatter_weights)

  out = sampled() if sampling_ratio > 0 else jax.lax.cond(fits, sampled, exact)
  return out.astype(features[0].dtype)


def _round_half_away(v):
  """C's round(): halves away from zero (jnp.round rounds them to even)."""
  return jnp.sign(v) * jnp.floor(jnp.abs(v) + 0.5)


def _sparse_table(features):
  """T[i, j, n, h, w] = max of features over [h, h+2^i) x [w, w+2^j).

  [LH, LW, N, H, W, C] with LH = floor(log2 H) + 1: any rectangle's max is
  the max of four overlapping power-of-two blocks. Memory is LH * LW copies
  of the features, fine for the stride-16 maps ROI Pool is used on.
  """
  n, h, w, c = features.shape
  neg = jnp.array(-jnp.inf, features.dtype)

  def shifted_max(t, axis, d):
    pad = [(0, 0)] * t.ndim
    pad[axis] = (0, d)
    other = jax.lax.slice_in_dim(jnp.pad(t, pad, constant_values=neg), d, d + t.shape[axis],
                                 axis=axis)
    return jnp.maximum(t, other)

  rows = [features]
  for i in range(1, h.bit_length()):
    rows.append(shifted_max(rows[-1], 1, 1 << (i - 1)))
  table = []
  for r in rows:
    cols = [r]
    for j in range(1, w.bit_length()):
      cols.append(shifted_max(cols[-1], 2, 1 << (j - 1)))
    table.append(jnp.stack(cols))
  return jnp.stack(table)


def roi_pool(features: jax.Array, boxes: jax.Array, box_indices: jax.Array,
             output_size: IntPair, spatial_scale: float = 1.0) -> jax.Array:
  """Equals `torchvision.ops.roi_pool` (Fast R-CNN max pooling; NHWC).

  Box corners are rounded to feature pixels (half away from zero), the
  inclusive ROI is split into oh x ow bins with floor/ceil edges, each bin is
  clipped to the map, and an empty bin gives 0. Exact for any bin size.

  Args:
    features: [N, H, W, C] float.
    boxes: [K, 4] float (x1, y1, x2, y2), input-image pixels.
    box_indices: [K] int image index.
    output_size: (oh, ow) or int.
    spatial_scale: feature-map pixels per input pixel.

  Returns:
    [K, oh, ow, C]; gradients go to each bin's maximum (not to the boxes).
  """
  oh, ow = pair(output_size, "output_size", minimum=1)
  features, boxes, box_indices = map(jnp.asarray, (features, boxes, box_indices))
  _check(features, boxes, box_indices, 1, 1, "gather")
  n, h, w, c = features.shape
  b = jax.lax.stop_gradient(boxes.astype(jnp.float32)) * jnp.float32(spatial_scale)
  x1, y1, x2, y2 = (_round_half_away(b[:, a]).astype(jnp.int32) for a in range(4))

  def bins(start, end, num, size):
    length = jnp.maximum(end - start + 1, 1).astype(jnp.float32)
    bin_size = _div(length, num)[:, None]
    p = jnp.arange(num, dtype=jnp.float32)[None]
    lo = jnp.floor(p * bin_size).astype(jnp.int32) + start[:, None]
    hi = jnp.ceil((p + 1) * bin_size).astype(jnp.int32) + start[:, None]
    return jnp.clip(lo, 0, size), jnp.clip(hi, 0, size)          # [K, num]

  hs, he = bins(y1, y2, oh, h)
  ws, we = bins(x1, x2, ow, w)
  log2 = jnp.asarray(np.floor(np.log2(np.maximum(np.arange(max(h, w) + 1), 1))), jnp.int32)
  lh = log2[jnp.maximum(he - hs, 1)]                               # [K, oh]
  lw = log2[jnp.maximum(we - ws, 1)]                               # [K, ow]
  table = _sparse_table(features)
  bi = box_indices.astype(jnp.int32)[:, None, None]
  li, lj = lh[:, :, None], lw[:, None, :]
  r0, r1 = hs[:, :, None], jnp.maximum(he - (1 << lh), 0)[:, :, None]
  c0, c1 = ws[:, None, :], jnp.maximum(we - (1 << lw), 0)[:, None, :]
  r0, r1 = jnp.minimum(r0, h - 1), jnp.minimum(r1, h - 1)
  c0, c1 = jnp.minimum(c0, w - 1), jnp.minimum(c1, w - 1)
  best = jnp.maximum(
      jnp.maximum(table[li, lj, bi, r0, c0], table[li, lj, bi, r0, c1]),
      jnp.maximum(table[li, lj, bi, r1, c0], table[li, lj, bi, r1, c1]))
  empty = (he <= hs)[:, :, None] | (we <= ws)[:, None, :]
  return jnp.where(empty[..., None], 0.0, best).astype(features.dtype)
