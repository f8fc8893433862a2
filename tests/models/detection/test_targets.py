"""Mask R-CNN targets and losses vs numpy loops from torchvision's semantics."""
import functools
import math

import numpy as np
import pytest

import jax

from conftest import needs
from segjax.models.detection.targets import (box_head_losses, compact_mask_targets, mask_loss,
                                             mask_targets, match, roi_targets, rpn_losses,
                                             rpn_targets, sample)
from segjax.ops import generate_anchors

jit_match = jax.jit(match, static_argnums=(2, 3, 4))
jit_sample = jax.jit(sample, static_argnums=(2, 3))


def rand_boxes(rng, n, size=100.0, lo=4.0):
  xy = rng.uniform(0, size, (n, 2))
  wh = rng.uniform(lo, size / 2, (n, 2))
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


@np.errstate(invalid="ignore")          # 0 / 0 for two empty (padding) boxes
def ref_iou(a, b):
  out = np.zeros((len(a), len(b)))
  for i, p in enumerate(a.astype(np.float64)):
    for j, q in enumerate(b.astype(np.float64)):
      inter = (max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
               * max(0.0, min(p[3], q[3]) - max(p[1], q[1])))
      out[i, j] = inter / ((p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter)
  return out


def ref_encode(gt, ref, w):
  """torchvision's encode_boxes for one pair, float64."""
  gw, gh = gt[2] - gt[0], gt[3] - gt[1]
  rw, rh = ref[2] - ref[0], ref[3] - ref[1]
  return np.array([w[0] * (gt[0] + gw / 2 - ref[0] - rw / 2) / rw,
                   w[1] * (gt[1] + gh / 2 - ref[1] - rh / 2) / rh,
                   w[2] * math.log(gw / rw), w[3] * math.log(gh / rh)])


def ref_match(iou, valid, high, low, allow_low_quality):
  """Matcher.__call__ + the RPN's label rule, over the valid GT rows only."""
  rows = np.flatnonzero(valid)
  n = iou.shape[1]
  if len(rows) == 0:
    return np.zeros(n, int), np.zeros(n, int)
  q = iou[rows]
  matches = q.argmax(0)
  vals = q.max(0)
  all_matches = matches.copy()
  matches = np.where(vals < low, -1, np.where(vals < high, -2, matches))
  if allow_low_quality:
    for g in range(len(rows)):
      for p in np.flatnonzero(q[g] == q[g].max()):
        matches[p] = all_matches[p]
  labels = np.where(matches >= 0, 1, np.where(matches == -1, 0, -1))
  return np.where(matches >= 0, rows[np.maximum(matches, 0)], 0), labels


def ties_case():
  """IoU with ties, a GT whose best is below `low`, one whose best is 0, padding."""
  iou = np.array([[0.2, 0.9, 0.1, 0.2, 0.0, 0.2],
                  [0.25, 0.1, 0.25, 0.0, 0.1, 0.05],   # best 0.25 twice, both < low
                  [0.99, 0.99, 0.99, 0.99, 0.99, 0.99],  # padding: must be ignored
                  [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], np.float32)  # best IoU 0
  return iou, np.array([True, True, False, True])


@pytest.mark.parametrize("high,low,alq", [(0.7, 0.3, True), (0.7, 0.3, False), (0.5, 0.5, False)])
def test_match_random_with_padding(high, low, alq):
  rng = np.random.RandomState(0)
  gt = rand_boxes(rng, 7)
  near = np.repeat(gt, 3, 0) + rng.uniform(-2, 2, (21, 4)).astype(np.float32)
  anchors = np.concatenate([rand_boxes(rng, 300), near])
  iou = ref_iou(gt, anchors).astype(np.float32)
  valid = np.array([1, 0, 1, 1, 0, 1, 1], bool)
  iou[~valid] = 0.95          # padding rows would win everything if read
  got_m, got_l = map(np.asarray, jit_match(iou, valid, high, low, alq))
  want_m, want_l = ref_match(iou, valid, high, low, alq)
  np.testing.assert_array_equal(got_l, want_l)
  np.testing.assert_array_equal(got_m, want_m)
  assert got_m.dtype == np.int32 and (got_l == 1).any() and (got_l == 0).any()


def test_match_low_quality_ties_and_zero_best():
  iou, valid = ties_case()
  m, l = map(np.asarray, jit_match(iou, valid, 0.7, 0.3, True))
  wm, wl = ref_match(iou, valid, 0.7, 0.3, True)
  np.testing.assert_array_equal(l, wl)
  np.testing.assert_array_equal(m, wm)
  # Both 0.25-ties of GT 1 are restored, matched to their own argmax GT:
  # column 0's best GT is 1, column 2's is 1; GT 3's best IoU is 0, so, as in
  # torchvision, every column where it is 0 is restored too (all of them).
  np.testing.assert_array_equal(l, [1, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(m, [1, 0, 1, 0, 1, 0])
  m, l = map(np.asarray, jit_match(iou[:3], valid[:3], 0.7, 0.3, True))
  np.testing.assert_array_equal(l, [1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(m, [1, 0, 1, 0, 0, 0])


def test_match_no_valid_gt_is_background():
  iou = np.random.RandomState(1).rand(3, 20).astype(np.float32)
  for alq in (True, False):
    m, l = jit_match(iou, np.zeros(3, bool), 0.7, 0.3, alq)
    assert not np.asarray(m).any() and not np.asarray(l).any()


@pytest.mark.parametrize("npos,nneg,ns,frac", [(300, 500, 256, 0.5), (20, 500, 256, 0.5),
                                               (300, 40, 256, 0.5), (5, 7, 512, 0.25),
                                               (0, 100, 64, 0.25)])
def test_sample_counts_and_eligibility(npos, nneg, ns, frac):
  rng = np.random.RandomState(npos + nneg)
  n = npos + nneg + 50
  labels = np.full(n, -1, np.int32)
  perm = rng.permutation(n)
  labels[perm[:npos]] = rng.randint(1, 4, npos)        # class ids count as positive
  labels[perm[npos:npos + nneg]] = 0
  out = np.asarray(jit_sample(jax.random.key(3), labels, ns, frac))
  want_pos = min(npos, int(ns * frac))
  assert (out >= 1).sum() == want_pos
  assert (out == 0).sum() == min(nneg, ns - want_pos)
  taken = out >= 0
  np.testing.assert_array_equal(out[taken], labels[taken])   # labels kept, only eligible
  assert ((out == -1) | (out == labels)).all()


def test_sample_randomness():
  labels = np.array([1] * 40 + [0] * 200 + [-1] * 30, np.int32)
  keys = jax.random.split(jax.random.key(0), 400)
  out = np.asarray(jax.jit(jax.vmap(lambda k: sample(k, labels, 64, 0.25)))(keys))
  assert not (out[0] == out[1]).all()
  np.testing.assert_array_equal(out[0], np.asarray(jit_sample(keys[0], labels, 64, 0.25)))
  # Uniform without replacement: positive i is taken with prob 16/40.
  freq = (out[:, :40] == 1).mean(0)
  assert abs(freq.mean() - 16 / 40) < 1e-6 and np.abs(freq - 0.4).max() < 0.12
  freq = (out[:, 40:240] == 0).mean(0)
  assert np.abs(freq - 48 / 200).max() < 0.12


def rpn_case():
  anchors = generate_anchors([(8, 8), (4, 4)], [8, 16], [(24,), (48,)], [(0.5, 1.0, 2.0)] * 2)
  gt = np.array([[10, 12, 40, 50], [30, 20, 62, 60], [0, 0, 0, 0], [5, 40, 20, 62]], np.float32)
  return np.asarray(anchors), gt, np.array([True, True, False, True])


def test_rpn_targets_vs_reference():
  anchors, gt, valid = rpn_case()
  labels, targets = map(np.asarray, jax.jit(rpn_targets)(jax.random.key(5), anchors, gt, valid))
  wm, wl = ref_match(ref_iou(gt, anchors), valid, 0.7, 0.3, True)
  assert ((labels == -1) | (labels == wl)).all()
  assert (labels == 1).sum() == min((wl == 1).sum(), 128)
  assert (labels == 0).sum() == min((wl == 0).sum(), 256 - (labels == 1).sum())
  for a in range(len(anchors)):
    want = ref_encode(gt[wm[a]], anchors[a], (1, 1, 1, 1)) if wl[a] == 1 else np.zeros(4)
    np.testing.assert_allclose(targets[a], want, rtol=1e-5, atol=1e-5)


def ref_roi(cands, cvalid, gt, cls, gvalid):
  """Per candidate (class target, matched gt, eligible) as assign_targets_to_proposals."""
  m, l = ref_match(ref_iou(gt, cands), gvalid, 0.5, 0.5, False)
  return np.where(l == 1, cls[m], l), m, cvalid & (l >= 0)


@pytest.mark.parametrize("num_props,ns", [(600, 128), (20, 128)])
def test_roi_targets_vs_reference(num_props, ns):
  rng = np.random.RandomState(num_props)
  gt = rand_boxes(rng, 5)
  gt[3] = 0.0
  gvalid = np.array([1, 1, 1, 0, 1], bool)
  cls = np.array([3, 1, 2, 7, 1], np.int32)
  props = np.concatenate([rand_boxes(rng, num_props - 10),
                          gt[[0, 1, 4]] + rng.uniform(-3, 3, (3, 4)).astype(np.float32),
                          gt[[0, 2]] + rng.uniform(-1, 1, (2, 4)).astype(np.float32),
                          np.zeros((5, 4), np.float32)])
  pvalid = np.arange(num_props) < num_props - 5
  fn = jax.jit(functools.partial(roi_targets, num_samples=ns))
  rois, ct, bt, mg, w = map(np.asarray, fn(jax.random.key(2), props, pvalid, gt, cls, gvalid))
  cands = np.concatenate([props, gt])
  want_c, want_m, eligible = ref_roi(cands, np.concatenate([pvalid, gvalid]), gt, cls, gvalid)
  npos, nneg = (eligible & (want_c > 0)).sum(), (eligible & (want_c == 0)).sum()
  take_pos = min(npos, int(ns * 0.25))
  count = take_pos + min(nneg, ns - take_pos)
  np.testing.assert_array_equal(w, np.arange(ns) < count)
  assert (ct > 0).sum() == take_pos
  # Each slot is a distinct eligible candidate, in candidate order (torch.where).
  idx = [int(np.flatnonzero((cands == r).all(1) & eligible)[0]) for r in rois[:count]]
  assert idx == sorted(set(idx))
  for s, i in enumerate(idx):
    assert ct[s] == want_c[i]
    want = (ref_encode(gt[want_m[i]], cands[i], (10, 10, 5, 5)) if want_c[i] > 0
            else np.zeros(4))
    assert mg[s] == (want_m[i] if want_c[i] > 0 else 0)
    np.testing.assert_allclose(bt[s], want, rtol=1e-4, atol=1e-4)
  assert not rois[count:].any() and not ct[count:].any() and not bt[count:].any()
  if num_props == 20:                   # every eligible candidate is taken
    assert count == eligible.sum()
    assert {i for i in idx if i >= num_props} == set(num_props + np.flatnonzero(gvalid))


def test_roi_targets_without_gt_are_background():
  rng = np.random.RandomState(3)
  props = rand_boxes(rng, 50)
  out = jax.jit(functools.partial(roi_targets, num_samples=64))(
      jax.random.key(0), props, np.ones(50, bool), np.zeros((2, 4), np.float32),
      np.zeros(2, np.int32), np.zeros(2, bool))
  rois, ct, bt, mg, w = map(np.asarray, out)
  assert w.sum() == 50 and not ct.any() and not bt.any() and not mg.any()
  assert np.isfinite(bt).all()


def ref_mask_targets(masks, rois, matched, m):
  """roi_align(aligned=False, scale 1, adaptive sampling) of one channel, loops."""
  out = np.zeros((len(rois), m, m))
  h, w = masks.shape[1:]

  def bilinear(f, y, x):
    if y < -1.0 or y > h or x < -1.0 or x > w:
      return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = min(int(y), h - 1), min(int(x), w - 1)
    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
    ly, lx = (y - y0, x - x0)
    ly, lx = (0.0 if y0 == h - 1 else ly), (0.0 if x0 == w - 1 else lx)
    return ((1 - ly) * (1 - lx) * f[y0, x0] + (1 - ly) * lx * f[y0, x1]
            + ly * (1 - lx) * f[y1, x0] + ly * lx * f[y1, x1])

  for k, (b, g) in enumerate(zip(rois.astype(np.float64), matched)):
    rw, rh = max(b[2] - b[0], 1.0), max(b[3] - b[1], 1.0)
    gh, gw = math.ceil(rh / m), math.ceil(rw / m)
    for p in range(m):
      for q in range(m):
        acc = sum(bilinear(masks[g], b[1] + p * rh / m + (i + 0.5) * rh / m / gh,
                           b[0] + q * rw / m + (j + 0.5) * rw / m / gw)
                  for i in range(gh) for j in range(gw))
        out[k, p, q] = acc / (gh * gw)
  return out


def test_mask_targets_vs_loop():
  rng = np.random.RandomState(0)
  masks = (rng.rand(3, 40, 36) > 0.5).astype(np.float32)
  rois = np.array([[2.3, 3.1, 30.2, 25.7], [0, 0, 36, 40], [10.5, 4, 11, 4.2],
                   [-3, 20, 12, 45], [5, 5, 21, 37]], np.float32)
  matched = np.array([0, 2, 1, 1, 2], np.int32)
  got = jax.jit(mask_targets, static_argnums=3)(masks, rois, matched, 7)
  assert got.shape == (5, 7, 7)
  want = ref_mask_targets(masks, rois, matched, 7)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # A "crop" of the whole image at its own resolution maps rois onto
  # themselves: the compact targets are then torchvision's exactly, which
  # pins down their half-pixel convention and the roi's 1-pixel minimum.
  square = masks[:, :36, :36]
  whole = np.tile(np.float32([0, 0, 36, 36]), (3, 1))
  compact = jax.jit(compact_mask_targets, static_argnums=4)
  want = ref_mask_targets(square, rois, matched, 7)
  np.testing.assert_allclose(compact(square, whole, rois, matched, 7), want, atol=1e-5)
  as_uint8 = compact((square * 255).astype(np.uint8), whole, rois, matched, 7)
  np.testing.assert_allclose(as_uint8, want, atol=1e-5)


def positive_rois(boxes, valid, n, rng):
  """n rois [n, 4] at IoU >= 0.5 with the valid boxes, and their matched [n]."""
  rows = np.flatnonzero(valid)
  rois, matched = [], []
  while len(rois) < n:
    g = rows[len(rois) % len(rows)]
    size = np.tile(boxes[g, 2:] - boxes[g, :2], 2)
    roi = boxes[g] + rng.uniform(-0.25, 0.25, 4) * size
    if ref_iou(boxes[g:g + 1], roi[None].astype(np.float32))[0, 0] >= 0.5:
      rois.append(roi)
      matched.append(g)
  return np.float32(rois), np.int32(matched)


def test_compact_mask_targets_close_to_full_on_shapes_scenes():
  """The training targets, from the input pipeline's 112 x 112 crops, against
  torchvision's from the image-sized masks, flipped or not (the docstring
  of segjax.data.instances has the figures at more sizes and scales)."""
  tf = needs("tensorflow")
  from segjax.data import instances, ops
  from segjax.data.builders import shapes
  g, rng = 6, np.random.RandomState(0)
  full_fn = jax.jit(mask_targets, static_argnums=3)
  compact_fn = jax.jit(compact_mask_targets, static_argnums=4)
  errors = []
  for index in range(4):
    scene = shapes.render_example(0, 0, index, 64)
    example = {"image": scene["image"], "objects": {
        "mask": scene["masks"][..., None].astype(np.uint8), "bbox": scene["boxes"],
        "label": scene["labels"] - 1}}
    example = tf.nest.map_structure(tf.constant, example)
    full = instances.select_instances(example, g, mask_size=None)
    ex = {**instances.select_instances(example, g), "masks": full["masks"]}
    if index % 2:
      ex = ops.flip_left_right(ex)
    ex = {k: v.numpy() for k, v in instances.pad_instances(ex, g).items()}
    rois, matched = positive_rois(ex["boxes"], ex["valid"], 32, rng)
    rois = np.clip(rois, 0, 64)  # as proposals are
    want = full_fn(ex["masks"], rois, matched, 28)
    got = compact_fn(ex["mask_crops"], ex["mask_boxes"], rois, matched, 28)
    errors.append(np.abs(np.asarray(got) - np.asarray(want)).mean())
  # Measured: 0.0046 on average. Reading the mask at pixel centres instead
  # of torchvision's half-pixel offset would make it 0.05.
  assert np.mean(errors) < 0.008, errors


def bce(x, t):
  return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0) - x * t


def sl1(d, beta=1 / 9):
  a = np.abs(d)
  return np.where(a < beta, 0.5 * a ** 2 / beta, a - 0.5 * beta)


def test_rpn_losses_vs_numpy():
  rng = np.random.RandomState(0)
  labels = rng.choice([-1, 0, 1], 200).astype(np.int32)
  obj, d, t = rng.randn(200) * 3, rng.randn(200, 4) * 0.2, rng.randn(200, 4) * 0.2
  lo, lb = jax.jit(rpn_losses)(obj, d, labels, t)
  s, p = labels >= 0, labels == 1
  np.testing.assert_allclose(lo, bce(obj[s], labels[s]).mean(), rtol=1e-5)
  np.testing.assert_allclose(lb, sl1(d[p] - t[p]).sum() / s.sum(), rtol=1e-5)


@pytest.mark.parametrize("flat", [False, True])
def test_box_head_losses_vs_numpy(flat):
  rng = np.random.RandomState(1)
  r, k = 40, 4
  logits = rng.randn(r, k + 1) * 2
  deltas = rng.randn(r, k + 1, 4) * 0.3
  cls = rng.randint(0, k + 1, r).astype(np.int32)
  t = rng.randn(r, 4) * 0.3
  w = (np.arange(r) < 33).astype(np.float32)
  cls[33:] = 0
  lc, lb = jax.jit(box_head_losses)(logits, deltas.reshape(r, -1) if flat else deltas, cls, t, w)
  lse = np.log(np.exp(logits).sum(1))
  ce = lse - logits[np.arange(r), cls]
  np.testing.assert_allclose(lc, ce[:33].mean(), rtol=1e-5)
  pos = np.flatnonzero(cls[:33] > 0)
  np.testing.assert_allclose(lb, sl1(deltas[pos, cls[pos]] - t[pos]).sum() / 33, rtol=1e-5)


def test_mask_loss_vs_numpy_and_batch_denominator():
  rng = np.random.RandomState(2)
  b, r, m, k = 2, 12, 6, 3
  logits = rng.randn(b, r, m, m, k + 1) * 2
  tgt = rng.rand(b, r, m, m)
  cls = rng.randint(0, k + 1, (b, r)).astype(np.int32)
  w = np.ones((b, r), np.float32)
  w[1, 8:] = 0
  cls[0, :9] = 0                                   # images get different positive counts
  per_image = jax.jit(jax.vmap(mask_loss))(logits, cls, tgt, w)
  pos = [np.flatnonzero((cls[i] > 0) & (w[i] > 0)) for i in range(b)]
  for i in range(b):
    want = bce(logits[i, pos[i], :, :, cls[i, pos[i]]], tgt[i, pos[i]]).mean()
    np.testing.assert_allclose(per_image[i], want, rtol=1e-5)
  # torchvision's batch loss: the mean over every positive pixel of the batch.
  n = sum(len(p) for p in pos)
  summed = jax.jit(jax.vmap(functools.partial(mask_loss, denominator=n)))(logits, cls, tgt, w)
  want = np.concatenate([bce(logits[i, pos[i], :, :, cls[i, pos[i]]], tgt[i, pos[i]])
                         for i in range(b)]).mean()
  np.testing.assert_allclose(np.sum(summed), want, rtol=1e-5)
  assert float(mask_loss(logits[0], np.zeros(r, np.int32), tgt[0], w[0])) == 0.0


def test_vmap_batch_end_to_end():
  anchors, gt, valid = rpn_case()
  gts = np.stack([gt, gt[::-1]])
  valids = np.stack([valid, np.zeros_like(valid)])
  keys = jax.random.split(jax.random.key(9), 2)
  labels, targets = jax.jit(jax.vmap(rpn_targets, in_axes=(0, None, 0, 0)))(
      keys, anchors, gts, valids)
  np.testing.assert_array_equal(labels[0], rpn_targets(keys[0], anchors, gt, valid)[0])
  # No valid GT: every anchor is a negative, and there are fewer than 256.
  assert (np.asarray(labels[1]) == 0).all() and len(anchors) < 256
  cls = np.array([[1, 2, 0, 1]] * 2, np.int32)
  props = np.stack([anchors[:100], anchors[100:200]])
  fn = jax.vmap(functools.partial(roi_targets, num_samples=64), in_axes=(0, 0, None, 0, 0, 0))
  rois, ct, bt, mg, w = jax.jit(fn)(keys, props, np.ones(100, bool), gts, cls, valids)
  assert rois.shape == (2, 64, 4) and not np.asarray(ct[1]).any()
  masks = np.zeros((2, 4, 64, 64), np.float32)
  masks[:, :, 10:40, 10:40] = 1
  mt = jax.jit(jax.vmap(mask_targets, in_axes=(0, 0, 0, None)), static_argnums=3)(
      masks, rois, mg, 14)
  assert mt.shape == (2, 64, 14, 14)
  rng = np.random.RandomState(0)
  losses = jax.jit(jax.vmap(box_head_losses))(rng.randn(2, 64, 3), rng.randn(2, 64, 12),
                                              ct, bt, w)
  assert all(np.isfinite(np.asarray(l)).all() for l in losses)


# --- parity with torchvision (runs where torch + torchvision are importable) ---

def test_matcher_and_rpn_targets_match_torchvision():
  torch = needs("torch")
  needs("torchvision")
  from torchvision.models.detection._utils import BoxCoder, Matcher
  rng = np.random.RandomState(7)
  gt, anchors = rand_boxes(rng, 6), rand_boxes(rng, 400)
  iou = ref_iou(gt, anchors).astype(np.float32)
  for high, low, alq in [(0.7, 0.3, True), (0.5, 0.5, False)]:
    want = Matcher(high, low, alq)(torch.from_numpy(iou)).numpy()
    m, l = map(np.asarray, match(iou, np.ones(6, bool), high, low, alq))
    np.testing.assert_array_equal(l, np.where(want >= 0, 1, np.where(want == -1, 0, -1)))
    np.testing.assert_array_equal(m, np.maximum(want, 0))
  iou, valid = ties_case()
  want = Matcher(0.7, 0.3, True)(torch.from_numpy(iou[valid])).numpy()
  m, l = map(np.asarray, match(iou, valid, 0.7, 0.3, True))
  np.testing.assert_array_equal(l, np.where(want >= 0, 1, np.where(want == -1, 0, -1)))
  np.testing.assert_array_equal(m, np.flatnonzero(valid)[np.maximum(want, 0)] * (want >= 0))
  # Box targets of the RPN's foreground anchors.
  want = Matcher(0.7, 0.3, True)(torch.from_numpy(ref_iou(gt, anchors).astype(np.float32)))
  fg = (want >= 0).numpy()
  enc = BoxCoder((1.0, 1.0, 1.0, 1.0)).encode_single(
      torch.from_numpy(gt)[want.clamp(min=0)], torch.from_numpy(anchors)).numpy()
  _, targets = rpn_targets(jax.random.key(0), anchors, gt, np.ones(6, bool))
  np.testing.assert_allclose(np.asarray(targets)[fg], enc[fg], rtol=1e-5, atol=1e-5)


def test_losses_and_mask_targets_match_torchvision():
  torch = needs("torch")
  needs("torchvision")
  from torchvision.models.detection.roi_heads import (fastrcnn_loss, maskrcnn_loss,
                                                      project_masks_on_boxes)
  rng = np.random.RandomState(3)
  r, k, m = 30, 3, 14
  logits = rng.randn(r, k + 1).astype(np.float32)
  deltas = rng.randn(r, (k + 1) * 4).astype(np.float32)
  cls = rng.randint(0, k + 1, r)
  t = rng.randn(r, 4).astype(np.float32)
  want = fastrcnn_loss(torch.from_numpy(logits), torch.from_numpy(deltas),
                       [torch.from_numpy(cls)], [torch.from_numpy(t)])
  got = box_head_losses(logits, deltas, cls, t, np.ones(r, np.float32))
  np.testing.assert_allclose(got, [float(x) for x in want], rtol=1e-5)
  masks = (rng.rand(2, 50, 60) > 0.4).astype(np.float32)
  boxes = rand_boxes(rng, r, 50.0, lo=2.0)
  matched = rng.randint(0, 2, r)
  want_t = project_masks_on_boxes(torch.from_numpy(masks), torch.from_numpy(boxes),
                                  torch.from_numpy(matched), m).numpy()
  got_t = mask_targets(masks, boxes, matched, m)
  np.testing.assert_allclose(got_t, want_t, atol=1e-5)
  mlog = rng.randn(r, k + 1, m, m).astype(np.float32)
  pos = cls > 0
  gt_labels = np.array([2, 3])
  # maskrcnn_loss gets the positive rois only and reads their class as
  # gt_labels[matched]; here the same rois carry that class, the rest 0.
  want = maskrcnn_loss(torch.from_numpy(mlog[pos]), [torch.from_numpy(boxes[pos])],
                       [torch.from_numpy(masks)], [torch.from_numpy(gt_labels)],
                       [torch.from_numpy(matched[pos])])
  roi_cls = np.where(pos, gt_labels[matched], 0)
  got = mask_loss(np.moveaxis(mlog, 1, -1), roi_cls, got_t, np.ones(r, np.float32))
  np.testing.assert_allclose(got, float(want), rtol=1e-5)
