"""roi_align / roi_pool / multilevel_roi_align vs numpy loops and torchvision."""
import functools
import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.test_util import check_grads

from conftest import needs
from segjax.errors import ConfigError
from segjax.ops import fpn_levels, multilevel_roi_align, roi_align, roi_pool

# Against torchvision (no README figure: "Parity tests" names these
# comparisons without one). Measured max |ours - torchvision| on N(0, 1)
# features, both impls: roi_align 7.2e-7, its gradient 1.9e-6,
# MultiScaleRoIAlign 2.4e-7. ROI Pool is compared for equality.
TORCHVISION_ROI_ALIGN_ATOL = 5e-6
TORCHVISION_ROI_ALIGN_GRAD_ATOL = 1e-5


def ref_bilinear(f, y, x):
  """torchvision's bilinear_interpolate (one channel-vector) with its boundary rules."""
  h, w = f.shape[:2]
  if y < -1.0 or y > h or x < -1.0 or x > w:
    return np.zeros(f.shape[-1])
  y, x = max(y, 0.0), max(x, 0.0)
  y0, x0 = int(y), int(x)
  if y0 >= h - 1:
    y0 = y1 = h - 1
    y = float(y0)
  else:
    y1 = y0 + 1
  if x0 >= w - 1:
    x0 = x1 = w - 1
    x = float(x0)
  else:
    x1 = x0 + 1
  ly, lx = y - y0, x - x0
  return ((1 - ly) * (1 - lx) * f[y0, x0] + (1 - ly) * lx * f[y0, x1]
          + ly * (1 - lx) * f[y1, x0] + ly * lx * f[y1, x1])


def ref_roi_align(feats, boxes, bidx, out, scale, sr, aligned, cap=None):
  """Four-neighbour samples averaged per bin, from torchvision's definition."""
  oh, ow = out
  res = np.zeros((len(boxes), oh, ow, feats.shape[-1]))
  off = 0.5 if aligned else 0.0
  for k, (b, n) in enumerate(zip(boxes.astype(np.float64), bidx)):
    x1, y1, x2, y2 = b * scale - off
    rw, rh = x2 - x1, y2 - y1
    if not aligned:
      rw, rh = max(rw, 1.0), max(rh, 1.0)
    gh = sr if sr > 0 else math.ceil(rh / oh)
    gw = sr if sr > 0 else math.ceil(rw / ow)
    if cap is not None:
      gh, gw = min(gh, cap), min(gw, cap)
    count = max(gh * gw, 1)
    for p in range(oh):
      for q in range(ow):
        acc = np.zeros(feats.shape[-1])
        for iy in range(gh):
          y = y1 + p * rh / oh + (iy + 0.5) * rh / oh / gh
          for ix in range(gw):
            x = x1 + q * rw / ow + (ix + 0.5) * rw / ow / gw
            acc += ref_bilinear(feats[n], y, x)
        res[k, p, q] = acc / count
  return res


def random_boxes(rng, k, lo, hi, size_hi):
  xy = rng.uniform(lo, hi, (k, 2))
  wh = rng.uniform(-1, size_hi, (k, 2))
  wh[:3] = 0.0      # empty boxes
  wh[3:6] = 0.3     # tiny boxes
  boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
  boxes[6:10] = np.round(boxes[6:10])  # sample points landing on integers
  boxes[10] = [-30, -30, -20, -20]     # wholly outside the map
  return boxes


@pytest.fixture(scope="module")
def data():
  rng = np.random.RandomState(0)
  feats = rng.randn(2, 9, 11, 3).astype(np.float32)
  boxes = random_boxes(rng, 24, -6, 16, 12)
  bidx = rng.randint(0, 2, len(boxes)).astype(np.int32)
  return feats, boxes, bidx


ARGS = [((2, 3), 1.0, -1, False), ((2, 3), 0.5, 0, True), ((3, 3), 1.0, 2, True),
        ((3, 2), 0.5, 1, False), ((2, 2), 1.0, 3, False), ((4, 4), 1.0, 0, True)]


@pytest.mark.parametrize("out,scale,sr,aligned", ARGS)
def test_roi_align_matches_definition_both_impls(data, out, scale, sr, aligned):
  feats, boxes, bidx = data
  want = ref_roi_align(feats, boxes, bidx, out, scale, sr, aligned)
  for impl in ("gather", "einsum"):
    got = jax.jit(lambda f, b, i: roi_align(f, b, i, out, scale, sr, aligned,
                                            max_sampling_ratio=12, impl=impl))(feats, boxes, bidx)
    np.testing.assert_allclose(got, want, atol=1e-5, err_msg=impl)


def test_adaptive_past_max_sampling_ratio_is_exact(data):
  feats, boxes, bidx = data
  want = ref_roi_align(feats, boxes, bidx, (2, 2), 1.0, 0, False)
  for impl in ("gather", "einsum"):
    got = roi_align(feats, boxes, bidx, (2, 2), 1.0, 0, False, max_sampling_ratio=2,
                    impl=impl)
    np.testing.assert_allclose(got, want, atol=1e-5, err_msg=impl)


# Adaptive sampling of boxes from 1 pixel to larger than the 40 x 52 map.
# Measured max |error| on N(0, 1) features, both impls, both `aligned`, 2x3
# and 7x7: 4.8e-7 against torchvision; 6.7e-6 against the float64 loop, which
# places the samples exactly where torchvision and segjax round them to
# float32 (x ~ 50: an ulp is 4e-6). The cap-at-4 sampling this replaced was
# off by up to 0.7.
ADAPTIVE_ATOL = 2e-6
ADAPTIVE_LOOP_ATOL = 2e-5


@pytest.fixture(scope="module")
def any_size():
  rng = np.random.RandomState(3)
  feats = rng.randn(2, 40, 52, 2).astype(np.float32)
  side = np.array([1.0, 1.7, 3.2, 6.5, 13.0, 21.4, 29.9, 38.3, 47.1, 55.6, 61.0, 77.7])
  xy = rng.uniform(-12, 40, (len(side), 2))
  aspect = rng.uniform(0.6, 1.6, len(side))
  boxes = np.concatenate([xy, xy + np.stack([side, side * aspect], 1)], 1)
  boxes = np.concatenate([boxes, [[-15.0, -9.0, 70.0, 55.0], [0.0, 0.0, 52.0, 40.0]]])
  bidx = rng.randint(0, 2, len(boxes)).astype(np.int32)
  return feats, boxes.astype(np.float32), bidx


@pytest.mark.parametrize("out", [(2, 3), (7, 7)])
@pytest.mark.parametrize("aligned", [False, True])
def test_adaptive_exact_for_any_box_size(any_size, out, aligned):
  torch = needs("torch")
  tvo = needs("torchvision.ops")
  feats, boxes, bidx = any_size
  rois = torch.from_numpy(np.concatenate([bidx[:, None].astype(np.float32), boxes], 1))
  ft = torch.from_numpy(feats).permute(0, 3, 1, 2)
  want_tv = tvo.roi_align(ft, rois, out, 1.0, 0, aligned).permute(0, 2, 3, 1).numpy()
  want = ref_roi_align(feats, boxes, bidx, out, 1.0, 0, aligned)
  for impl in ("gather", "einsum"):
    # Traced boxes: the sample counts are data, not constants.
    got = jax.jit(lambda f, b, i: roi_align(f, b, i, out, 1.0, 0, aligned, impl=impl))(
        feats, boxes, bidx)
    print(f"{impl} {out} aligned={aligned}: torchvision {np.abs(got - want_tv).max():.1e}"
          f", float64 loop {np.abs(got - want).max():.1e}")
    np.testing.assert_allclose(got, want_tv, atol=ADAPTIVE_ATOL, err_msg=impl)
    np.testing.assert_allclose(got, want, atol=ADAPTIVE_LOOP_ATOL, err_msg=impl)
  # Differentiable in the boxes, alike in both implementations, and the
  # exact path's box gradient is the fixed-grid path's where both apply.
  loss = lambda b, impl, m: jnp.sum(jnp.sin(roi_align(
      feats, b, bidx, out, 1.0, 0, aligned, max_sampling_ratio=m, impl=impl)))
  grad = jax.jit(jax.grad(loss), static_argnums=(1, 2))
  g = [grad(boxes, impl, 4) for impl in ("gather", "einsum")]
  assert np.all(np.isfinite(g[0])) and np.any(g[0])
  np.testing.assert_allclose(g[0], g[1], atol=1e-4)
  # 50 samples a bin fit every box here: the fixed grid, whose box gradient
  # the other tests check, against the dense path max_sampling_ratio=1 takes.
  np.testing.assert_allclose(grad(boxes, "einsum", 1), grad(boxes, "einsum", 50),
                             atol=1e-4)


def test_roi_align_grads_vmap(data):
  feats, boxes, bidx = data
  # Boxes well inside the map and off integer sample points: smooth in the box.
  b = np.array([[1.3, 2.1, 7.4, 6.2], [0.6, 0.7, 5.9, 8.1]], np.float32)
  i = np.array([0, 1], np.int32)
  for impl in ("gather", "einsum"):
    f = jax.jit(lambda ft, bx: roi_align(ft, bx, i, (2, 2), 1.0, 2, True, impl=impl))
    check_grads(f, (jnp.asarray(feats[:, :9, :9, :1]), jnp.asarray(b)), order=1, modes=["rev"],
                atol=5e-2, rtol=5e-2, eps=1e-2)
  # Gradients of both implementations agree.
  grads = [jax.jit(jax.grad(
      lambda ft, bx: jnp.sum(roi_align(ft, bx, i, 3, 1.0, 0, False, impl=m) ** 2),
      argnums=(0, 1)))(feats, b) for m in ("gather", "einsum")]
  for a, c in zip(*grads):
    np.testing.assert_allclose(a, c, atol=1e-4)
  one = jax.jit(lambda bx: roi_align(feats, bx, i, 2, 1.0, 2))
  batched = jax.jit(jax.vmap(one))(np.stack([b, b + 1]))
  np.testing.assert_allclose(batched[1], one(b + 1), atol=1e-6)


def test_roi_align_chunked_equals_unchunked(data, monkeypatch):
  feats, boxes, bidx = data
  want = roi_align(feats, boxes, bidx, 2, 1.0, 2)
  from segjax.ops import roi
  monkeypatch.setattr(roi, "_GATHER_BUDGET", 200)
  for impl in ("gather", "einsum"):
    np.testing.assert_allclose(roi_align(feats, boxes, bidx, 2, 1.0, 2, impl=impl), want,
                               atol=1e-5)


def ref_roi_pool(feats, boxes, bidx, out, scale):
  """torchvision roi_pool from its definition."""
  oh, ow = out
  h, w = feats.shape[1:3]
  rnd = lambda v: int(np.sign(v) * np.floor(abs(v) + 0.5))
  res = np.zeros((len(boxes), oh, ow, feats.shape[-1]), np.float32)
  for k, (b, n) in enumerate(zip(boxes, bidx)):
    x1, y1, x2, y2 = (rnd(np.float32(v) * np.float32(scale)) for v in b)
    bh = np.float32(max(y2 - y1 + 1, 1)) / np.float32(oh)
    bw = np.float32(max(x2 - x1 + 1, 1)) / np.float32(ow)
    for p in range(oh):
      hs = min(max(int(np.floor(np.float32(p) * bh)) + y1, 0), h)
      he = min(max(int(np.ceil(np.float32(p + 1) * bh)) + y1, 0), h)
      for q in range(ow):
        ws = min(max(int(np.floor(np.float32(q) * bw)) + x1, 0), w)
        we = min(max(int(np.ceil(np.float32(q + 1) * bw)) + x1, 0), w)
        if he > hs and we > ws:
          res[k, p, q] = feats[n, hs:he, ws:we].max((0, 1))
  return res


@pytest.mark.parametrize("out,scale", [((2, 3), 1.0), ((3, 3), 0.5), ((1, 1), 0.3)])
def test_roi_pool_matches_definition(data, out, scale):
  feats, boxes, bidx = data
  got = jax.jit(lambda f, b, i: roi_pool(f, b, i, out, scale))(feats, boxes, bidx)
  np.testing.assert_array_equal(got, ref_roi_pool(feats, boxes, bidx, out, scale))
  # The gradient goes to each bin's maximum (once per bin that picked it).
  b, i = np.array([[1.0, 1.0, 8.0, 7.0]], np.float32) / scale, np.array([1], np.int32)
  g = np.asarray(jax.grad(lambda f: jnp.sum(roi_pool(f, b, i, out, scale)))(feats))
  assert g.sum() == out[0] * out[1] * feats.shape[-1]
  pooled = np.asarray(roi_pool(feats, b, i, out, scale))
  picked = np.repeat(feats[g > 0], g[g > 0].astype(int))
  np.testing.assert_array_equal(np.sort(picked), np.sort(pooled.reshape(-1)))


def test_fpn_levels_and_multilevel(data):
  boxes = np.array([[0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 111, 111], [0, 0, 448, 448],
                    [0, 0, 10, 10], [0, 0, 2000, 2000], [5, 5, 5, 5]], np.float32)
  np.testing.assert_array_equal(fpn_levels(boxes, 2, 5), [2, 1, 0, 3, 0, 3, 0])
  rng = np.random.RandomState(1)
  scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
  feats = [rng.randn(2, 128 // int(1 / s), 160 // int(1 / s), 2).astype(np.float32) for s in scales]
  xy = rng.uniform(0, 120, (12, 2))
  b = np.concatenate([xy, xy + np.exp(rng.uniform(1, 5.5, (12, 2)))], 1).astype(np.float32)
  i = rng.randint(0, 2, 12).astype(np.int32)
  lv = np.asarray(fpn_levels(b, 2, 5))
  want = np.stack([ref_roi_align(feats[l], b[k:k + 1], i[k:k + 1], (3, 3), scales[l], 2, False)[0]
                   for k, l in enumerate(lv)])
  for impl in ("gather", "einsum"):
    got = jax.jit(lambda f, bb, ii: multilevel_roi_align(f, bb, ii, 3, scales, 2, impl=impl))(
        feats, b, i)
    np.testing.assert_allclose(got, want, atol=1e-5, err_msg=impl)
  with pytest.raises(ConfigError):
    multilevel_roi_align(feats, b, i, 3, scales[:3])


def test_errors(data):
  feats, boxes, bidx = data
  with pytest.raises(ConfigError):
    roi_align(feats, boxes[:, :3], bidx, 2)
  with pytest.raises(ConfigError):
    roi_align(feats, boxes, bidx, 2, impl="loop")


def test_matches_torchvision(data):
  torch = needs("torch")
  tvo = needs("torchvision.ops")
  from collections import OrderedDict
  feats, boxes, bidx = data
  ft = torch.from_numpy(feats).permute(0, 3, 1, 2)
  rois = torch.from_numpy(np.concatenate([bidx[:, None].astype(np.float32), boxes], 1))
  # Two (output size, scale) pairs: each is its own argument of the same code.
  for out, scale in (((2, 3), 1.0), ((7, 7), 0.5)):
    # Adaptive sampling (ratio <= 0) and a fixed ratio, each alignment.
    for sr, aligned in ((-1, False), (0, True), (2, False), (3, True)):
      want = tvo.roi_align(ft, rois, out, scale, sr, aligned).permute(0, 2, 3, 1).numpy()
      for impl in ("gather", "einsum"):
        got = jax.jit(functools.partial(roi_align, output_size=out, spatial_scale=scale,
                                        sampling_ratio=sr, aligned=aligned,
                                        max_sampling_ratio=12, impl=impl))(
                                            feats, boxes, bidx)
        np.testing.assert_allclose(got, want, atol=TORCHVISION_ROI_ALIGN_ATOL)
    want = tvo.roi_pool(ft, rois, out, scale).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(roi_pool(feats, boxes, bidx, out, scale), want)
  # Gradients w.r.t. features equal torchvision's backward.
  ftg = ft.clone().requires_grad_(True)
  tvo.roi_align(ftg, rois, (3, 3), 0.5, 2, True).pow(2).sum().backward()
  g = jax.grad(lambda f: jnp.sum(roi_align(f, boxes, bidx, 3, 0.5, 2, True) ** 2))(feats)
  np.testing.assert_allclose(g, ftg.grad.permute(0, 2, 3, 1).numpy(),
                             atol=TORCHVISION_ROI_ALIGN_GRAD_ATOL)
  # FPN: MultiScaleRoIAlign.
  rng = np.random.RandomState(2)
  img = (256, 320)
  fl = [rng.randn(2, img[0] // s, img[1] // s, 4).astype(np.float32) for s in (4, 8, 16, 32)]
  xy = rng.uniform(0, 250, (40, 2))
  b = np.concatenate([xy, xy + np.exp(rng.uniform(1.4, 5.7, (40, 2)))], 1).astype(np.float32)
  bi = np.sort(rng.randint(0, 2, 40)).astype(np.int32)
  m = tvo.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
  x = OrderedDict((str(k), torch.from_numpy(a).permute(0, 3, 1, 2)) for k, a in enumerate(fl))
  want = m(x, [torch.from_numpy(b[bi == k]) for k in range(2)], [img, img])
  for impl in ("gather", "einsum"):
    got = jax.jit(functools.partial(multilevel_roi_align, output_size=7,
                                    spatial_scales=[1 / 4, 1 / 8, 1 / 16, 1 / 32],
                                    sampling_ratio=2, impl=impl))(fl, b, bi)
    np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(),
                               atol=TORCHVISION_ROI_ALIGN_ATOL)
