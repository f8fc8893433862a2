"""Mask R-CNN post-processing vs numpy loops of torchvision's semantics, and
vs torchvision itself where it is importable.

The references transcribe roi_heads.py (postprocess_detections,
paste_masks_in_image) one box at a time in float64; the torchvision tests
run the real functions on the same inputs:
  .venv-parity/bin/python -m pytest -q tests/models/detection/test_postprocess.py
"""
import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from conftest import needs
from segjax.errors import ConfigError
from segjax.models.detection.postprocess import (class_mask_probs, paste_masks,
                                                 postprocess_detections, select_detections)

CLIP = math.log(1000.0 / 16)
CANVAS = (64, 96)


def make_detection_case(seed, p=60, c=5):
  """Random head outputs over clustered proposals, with the edge cases mixed in."""
  rng = np.random.RandomState(seed)
  centres = rng.uniform(0, 90, (6, 2))
  xy = centres[rng.randint(0, 6, p)] + rng.uniform(-6, 6, (p, 2))
  wh = rng.uniform(6, 40, (p, 2))
  proposals = np.concatenate([xy - wh / 2, xy + wh / 2], 1).astype(np.float32)
  logits = (rng.randn(p, c) * 2).astype(np.float32)
  deltas = (rng.randn(p, c, 4) * 0.5).astype(np.float32)
  deltas[:4, :, 2] = -60.0             # widths ~1e-25 px: removed as small boxes
  deltas[4:6, :, 3] = 30.0             # heights capped by the log(1000/16) clip
  logits[:4] += 5.0                    # ... though they score high
  valid = np.ones(p, bool)
  valid[-7:] = False                   # padding slots of select_proposals
  return logits, deltas, proposals, valid


def ref_decode(d, a, w=(10.0, 10.0, 5.0, 5.0)):
  aw, ah = a[2] - a[0], a[3] - a[1]
  cx, cy = a[0] + 0.5 * aw, a[1] + 0.5 * ah
  dx, dy = d[0] / w[0], d[1] / w[1]
  dw, dh = min(d[2] / w[2], CLIP), min(d[3] / w[3], CLIP)
  px, py, pw, ph = dx * aw + cx, dy * ah + cy, math.exp(dw) * aw, math.exp(dh) * ah
  return np.array([px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw, py + 0.5 * ph])


def ref_iou(p, q):
  inter = max(0.0, min(p[2], q[2]) - max(p[0], q[0])) * max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
  return inter / ((p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter)


def ref_postprocess(logits, deltas, proposals, valid, size, thresh=0.05, nms=0.5, top=100,
                    min_size=1e-2):
  """postprocess_detections for one image, one candidate at a time, float64."""
  h, w = size
  cands = []                                              # (score, class, box)
  for i in np.flatnonzero(valid):
    z = logits[i].astype(np.float64)
    probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    for c in range(1, logits.shape[1]):
      b = np.clip(ref_decode(deltas[i, c].astype(np.float64), proposals[i].astype(np.float64)),
                  0, [w, h, w, h])
      if probs[c] > thresh and b[2] - b[0] >= min_size and b[3] - b[1] >= min_size:
        cands.append((probs[c], c, b))
  kept = []
  for c in range(1, logits.shape[1]):
    live = sorted([x for x in cands if x[1] == c], key=lambda x: -x[0])
    while live:
      best = live.pop(0)
      kept.append(best)
      live = [x for x in live if ref_iou(best[2], x[2]) <= nms]
  return sorted(kept, key=lambda x: -x[0])[:top]


def check_against(ref, out, i=None):
  take = (lambda k: np.asarray(out[k])) if i is None else (lambda k: np.asarray(out[k][i]))
  n = len(ref)
  valid = take("valid")
  assert valid.sum() == n and valid[:n].all()
  np.testing.assert_allclose(take("scores")[:n], [r[0] for r in ref], rtol=1e-5)
  np.testing.assert_array_equal(take("classes")[:n], [r[1] for r in ref])
  np.testing.assert_allclose(take("boxes")[:n], np.array([r[2] for r in ref]).reshape(n, 4),
                             rtol=1e-5, atol=1e-4)
  assert not take("scores")[n:].any() and not take("boxes")[n:].any()
  assert not take("classes")[n:].any()


@pytest.mark.parametrize("top,size", [(100, (64, 96)), (12, (50, 70))])
def test_select_detections_matches_numpy_loop(top, size):
  logits, deltas, proposals, valid = make_detection_case(0)
  fn = jax.jit(lambda *a: select_detections(*a, detections_per_img=top))
  out = fn(logits, deltas, proposals, valid, jnp.asarray(size))
  ref = ref_postprocess(logits, deltas, proposals, valid, size, top=top)
  assert 6 < len(ref) <= top         # NMS kept several boxes per class
  if top == 12:
    assert len(ref) == 12            # ... and more than fit: truncated to the top 12
  check_against(ref, out)


def test_postprocess_detections_batched_and_flat_deltas():
  cases = [make_detection_case(s) for s in (1, 2)]
  sizes = np.array([[64, 96], [40, 60]], np.int32)
  stacked = [np.stack(x) for x in zip(*cases)]
  logits, deltas, proposals, valid = stacked
  fn = jax.jit(lambda *a: postprocess_detections(*a, detections_per_img=30, score_thresh=0.1))
  # torchvision's [P, 4(K+1)] delta layout is accepted too.
  out = fn(logits, deltas.reshape(2, 60, -1), proposals, valid, sizes)
  assert out["boxes"].shape == (2, 30, 4) and out["classes"].dtype == jnp.int32
  for i in range(2):
    check_against(ref_postprocess(*cases[i], sizes[i], thresh=0.1, top=30), out, i)


def test_select_detections_with_nothing_above_threshold():
  logits, deltas, proposals, valid = make_detection_case(3)
  logits[:, 0] = 50.0                 # background wins everywhere
  out = select_detections(logits, deltas, proposals, valid, (64, 96), detections_per_img=5)
  assert not np.asarray(out["valid"]).any() and not np.asarray(out["boxes"]).any()
  with pytest.raises(ConfigError):
    select_detections(logits, deltas, proposals, valid, (64, 96), detections_per_img=0)


def ref_paste(mask, box, im_h, im_w, padding=1):
  """paste_mask_in_image (with expand_masks / expand_boxes) for one mask, float64 resize."""
  m = mask.shape[0]
  padded = np.pad(mask.astype(np.float64), padding)
  scale = np.float32((m + 2 * padding) / m)
  box = box.astype(np.float32)
  half = np.float32(0.5)
  w_half, h_half = (box[2] - box[0]) * half * scale, (box[3] - box[1]) * half * scale
  xc, yc = (box[2] + box[0]) * np.float32(0.5), (box[3] + box[1]) * np.float32(0.5)
  b = [int(v) for v in (xc - w_half, yc - h_half, xc + w_half, yc + h_half)]   # trunc toward 0
  w, h = max(b[2] - b[0] + 1, 1), max(b[3] - b[1] + 1, 1)
  s = padded.shape[0]

  def taps(n):                        # F.interpolate(bilinear, align_corners=False)
    out = []
    for u in range(n):
      src = max((s / n) * (u + 0.5) - 0.5, 0.0)
      i0 = min(int(math.floor(src)), s - 1)
      lam = min(max(src - i0, 0.0), 1.0)
      out.append((i0, min(i0 + 1, s - 1), lam))
    return out

  ty, tx = taps(h), taps(w)
  resized = np.zeros((h, w))
  for y, (y0, y1, ly) in enumerate(ty):
    for x, (x0, x1, lx) in enumerate(tx):
      resized[y, x] = ((1 - ly) * ((1 - lx) * padded[y0, x0] + lx * padded[y0, x1])
                       + ly * ((1 - lx) * padded[y1, x0] + lx * padded[y1, x1]))
  im = np.zeros((im_h, im_w))
  x_0, x_1 = max(b[0], 0), min(b[2] + 1, im_w)
  y_0, y_1 = max(b[1], 0), min(b[3] + 1, im_h)
  if x_1 > x_0 and y_1 > y_0:
    im[y_0:y_1, x_0:x_1] = resized[y_0 - b[1]:y_1 - b[1], x_0 - b[0]:x_1 - b[0]]
  return im


def make_paste_case(seed, d=7, m=28):
  rng = np.random.RandomState(seed)
  probs = rng.uniform(0, 1, (2, d, m, m)).astype(np.float32)
  xy = rng.uniform(-20, 90, (2, d, 2))
  wh = rng.uniform(1, 60, (2, d, 2))
  boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
  boxes[0, 0] = [10.0, 12.0, 10.3, 12.2]     # under a pixel: pastes a 2x2-ish blob
  boxes[0, 1] = [-5.5, -3.7, 30.0, 200.0]    # negative corner, past the canvas
  boxes[1, 0] = [0.0, 0.0, 96.0, 64.0]       # the whole canvas
  valid = np.ones((2, d), bool)
  valid[1, -1] = False
  sizes = np.array([[64, 96], [50, 70]], np.int32)
  return probs, boxes, valid, sizes


def test_paste_masks_matches_numpy_loop():
  probs, boxes, valid, sizes = make_paste_case(0)
  fn = jax.jit(lambda *a: paste_masks(*a, threshold=None), static_argnums=2)
  out = np.asarray(fn(probs, boxes, CANVAS, sizes, valid))
  assert out.shape == (2, 7) + CANVAS
  ref = np.zeros(out.shape)
  for i in range(2):
    for j in range(7):
      if valid[i, j]:
        ref[i, j, :sizes[i][0], :sizes[i][1]] = ref_paste(probs[i, j], boxes[i, j], *sizes[i])
  # The reference's source positions are float64, ATen's (and ours) float32.
  np.testing.assert_allclose(out, ref, atol=1e-5)
  assert ref[0, 0].any() and ref[0, 1].any()      # the edge cases paste something
  binary = np.asarray(jax.jit(paste_masks, static_argnums=2)(probs, boxes, CANVAS, sizes, valid))
  assert binary.dtype == bool
  decided = np.abs(ref - 0.5) > 1e-4
  np.testing.assert_array_equal(binary[decided], ref[decided] > 0.5)


def test_class_mask_probs_picks_the_class_channel():
  logits = np.random.RandomState(0).randn(2, 3, 4, 4, 5).astype(np.float32)
  classes = np.array([[1, 4, 0], [2, 2, 3]])
  out = np.asarray(class_mask_probs(logits, classes))
  for i in range(2):
    for j in range(3):
      np.testing.assert_allclose(out[i, j], 1 / (1 + np.exp(-logits[i, j, ..., classes[i, j]])),
                                 rtol=1e-6)


# --- torchvision itself (skipped without it) -------------------------------


@pytest.fixture(scope="module")
def tv():
  torch = needs("torch")
  needs("torchvision")
  from torchvision.models.detection import roi_heads
  torch.set_num_threads(1)
  return torch, roi_heads


@pytest.mark.parametrize("top", [100, 12])
def test_postprocess_detections_matches_torchvision(tv, top):
  torch, roi_heads = tv
  heads = roi_heads.RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None,
                             score_thresh=0.05, nms_thresh=0.5, detections_per_img=top)
  cases = [make_detection_case(s) for s in (4, 5)]
  sizes = [(64, 96), (47, 81)]
  # torchvision sees only the valid proposals of each image.
  logits = torch.cat([torch.from_numpy(c[0][c[3]]) for c in cases])
  deltas = torch.cat([torch.from_numpy(c[1][c[3]].reshape(-1, 20)) for c in cases])
  props = [torch.from_numpy(c[2][c[3]]) for c in cases]
  boxes, scores, labels = heads.postprocess_detections(logits, deltas, props, sizes)
  ours = jax.jit(lambda *a: postprocess_detections(*a, detections_per_img=top))(
      *[np.stack(x) for x in zip(*cases)], np.array(sizes))
  for i in range(2):
    n = len(scores[i])
    assert n > 6 and np.asarray(ours["valid"][i]).sum() == n
    np.testing.assert_array_equal(ours["classes"][i][:n], labels[i].numpy())
    np.testing.assert_allclose(ours["scores"][i][:n], scores[i].numpy(), rtol=1e-6)
    np.testing.assert_allclose(ours["boxes"][i][:n], boxes[i].numpy(), rtol=1e-6, atol=1e-5)


def test_paste_masks_matches_torchvision(tv):
  torch, roi_heads = tv
  probs, boxes, valid, sizes = make_paste_case(1)
  # Detections are clipped to their image. (torchvision's slicing breaks on
  # a box lying wholly past the image: it raises, or with negative slice
  # bounds may paste the wrong rows; paste_masks pastes nothing.)
  for i in range(2):
    boxes[i] = np.clip(boxes[i], 0, np.tile(sizes[i][::-1], 2))
  ours = np.asarray(jax.jit(lambda *a: paste_masks(*a, threshold=None), static_argnums=2)(
      probs, boxes, CANVAS, sizes, valid))
  for i in range(2):
    h, w = (int(s) for s in sizes[i])
    keep = valid[i]
    theirs = roi_heads.paste_masks_in_image(torch.from_numpy(probs[i][keep][:, None]),
                                            torch.from_numpy(boxes[i][keep]), (h, w))[:, 0]
    np.testing.assert_allclose(ours[i][keep][:, :h, :w], theirs.numpy(), atol=1e-6)
    assert not ours[i][:, h:].any() and not ours[i][:, :, w:].any()
    assert not ours[i][~keep].any()


def test_class_mask_probs_matches_torchvision(tv):
  torch, roi_heads = tv
  logits = np.random.RandomState(2).randn(6, 28, 28, 4).astype(np.float32)
  labels = torch.tensor([1, 3, 2, 2, 1, 3])
  theirs = roi_heads.maskrcnn_inference(torch.from_numpy(logits.transpose(0, 3, 1, 2)),
                                        [labels[:4], labels[4:]])
  ours = np.asarray(class_mask_probs(logits, labels.numpy()))
  np.testing.assert_allclose(ours, torch.cat(theirs)[:, 0].numpy(), rtol=1e-6)
