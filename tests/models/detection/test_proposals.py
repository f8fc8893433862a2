"""select_proposals vs a numpy loop of torchvision's filter_proposals."""
import functools
import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from conftest import needs
from segjax.errors import ConfigError
from segjax.models.detection.proposals import select_proposals
from segjax.ops import anchor_grid

LEVELS = [((16, 16), 4, (16,)), ((8, 8), 8, (32,)), ((2, 3), 16, (64,))]   # 768, 192, 18 anchors


def make_case(seed, image=(60, 50)):
  rng = np.random.RandomState(seed)
  anchors = [np.asarray(anchor_grid(f, s, z, (0.5, 1.0, 2.0))) for f, s, z in LEVELS]
  obj = [rng.randn(len(a)).astype(np.float32) * 3 for a in anchors]
  deltas = [(rng.randn(len(a), 4) * 0.3).astype(np.float32) for a in anchors]
  deltas[0][:5, 2] = -20.0     # widths of ~1e-9 px: removed as smaller than min_size
  obj[0][:5] = 9.0             # ... though they are the level's best
  obj[1][:3] = [-200.0, -150.0, 40.0]   # sigmoid underflows to 0 / saturates to 1
  return obj, deltas, anchors, image


def ref_decode(d, a):
  w, h = a[2] - a[0], a[3] - a[1]
  cx, cy = a[0] + 0.5 * w, a[1] + 0.5 * h
  dw, dh = min(d[2], math.log(1000.0 / 16)), min(d[3], math.log(1000.0 / 16))
  px, py, pw, ph = d[0] * w + cx, d[1] * h + cy, math.exp(dw) * w, math.exp(dh) * h
  return np.array([px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw, py + 0.5 * ph])


def ref_iou(p, q):
  inter = max(0.0, min(p[2], q[2]) - max(p[0], q[0])) * max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
  return inter / ((p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter)


def ref_select(obj, deltas, anchors, image, pre, post, thr=0.7, min_size=1e-3, score_thresh=0.0):
  """filter_proposals for one image: per level top-k, decode, clip, filter, NMS per level."""
  h, w = image
  cands = []                                  # (score, logit, level, box)
  for level, (o, d, a) in enumerate(zip(obj, deltas, anchors)):
    for i in np.argsort(-o, kind="stable")[:pre]:
      b = ref_decode(d[i].astype(np.float64), a[i].astype(np.float64))
      b = np.clip(b, 0, [w, h, w, h])
      s = 1 / (1 + math.exp(-float(o[i])))
      if b[2] - b[0] >= min_size and b[3] - b[1] >= min_size and s >= score_thresh:
        cands.append((s, float(o[i]), level, b))
  kept = []
  for level in range(len(obj)):
    live = sorted([c for c in cands if c[2] == level], key=lambda c: -c[1])
    while live:
      best = live.pop(0)
      kept.append(best)
      live = [c for c in live if ref_iou(best[3], c[3]) <= thr]
  kept = sorted(kept, key=lambda c: -c[1])[:post]
  return np.array([c[3] for c in kept]).reshape(-1, 4), np.array([c[0] for c in kept])


def run(obj, deltas, anchors, image, pre, post, **kw):
  fn = jax.jit(functools.partial(select_proposals, pre_nms_top_n=pre, post_nms_top_n=post, **kw))
  return map(np.asarray, fn(obj, deltas, anchors, jnp.asarray(image)))


@pytest.mark.parametrize("pre,post,thr,score_thresh", [(100, 150, 0.7, 0.0),
                                                       (300, 40, 0.5, 0.0),
                                                       (50, 400, 0.7, 0.3)])
def test_select_proposals_vs_reference(pre, post, thr, score_thresh):
  obj, deltas, anchors, image = make_case(pre + post)
  boxes, scores, valid = run(obj, deltas, anchors, image, pre, post, nms_threshold=thr,
                             score_thresh=score_thresh)
  want_b, want_s = ref_select(obj, deltas, anchors, image, pre, post, thr,
                              score_thresh=score_thresh)
  assert boxes.shape == (post, 4) and scores.shape == valid.shape == (post,)
  n = len(want_b)
  np.testing.assert_array_equal(valid, np.arange(post) < n)
  np.testing.assert_allclose(boxes[:n], want_b, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(scores[:n], want_s, rtol=1e-6, atol=1e-7)
  assert not boxes[n:].any() and not scores[n:].any()
  assert (boxes[:n, 2] - boxes[:n, 0] >= 1e-3).all()          # tiny boxes removed
  assert (boxes[:n] >= 0).all() and (boxes[:n, 2] <= image[1]).all()
  assert (boxes[:n, 3] <= image[0]).all()
  if post == 400:
    assert n < post                                  # padding slots in use


def test_vmap_per_image_sizes_and_no_gradient():
  cases = [make_case(s, image) for s, image in [(1, (60, 50)), (2, (30, 64))]]
  stack = lambda i: [np.stack(x) for x in zip(*[c[i] for c in cases])]
  obj, deltas = stack(0), stack(1)
  anchors = cases[0][2]
  sizes = np.array([c[3] for c in cases])
  fn = functools.partial(select_proposals, pre_nms_top_n=60, post_nms_top_n=80)
  boxes, scores, valid = jax.jit(jax.vmap(fn, in_axes=(0, 0, None, 0)))(obj, deltas, anchors, sizes)
  for i, c in enumerate(cases):
    want_b, want_s = ref_select(c[0], c[1], anchors, c[3], 60, 80)
    assert valid[i].sum() == len(want_b)
    np.testing.assert_allclose(boxes[i][: len(want_b)], want_b, rtol=1e-5, atol=1e-4)
  # Proposals are constants to the rest of the model, as torchvision detaches them.
  loss = lambda o, d: jnp.sum(fn(o, d, anchors, sizes[0])[0])
  g = jax.grad(loss, argnums=(0, 1))(cases[0][0], cases[0][1])
  assert all(not np.asarray(x).any() for x in jax.tree_util.tree_leaves(g))


def test_bad_levels_raise():
  obj, deltas, anchors, image = make_case(0)
  with pytest.raises(ConfigError, match="same number"):
    select_proposals(obj[:2], deltas, anchors, image, 10, 10)
  with pytest.raises(ConfigError, match="level 1"):
    select_proposals(obj, [deltas[0], deltas[0], deltas[2]], anchors, image, 10, 10)


def test_matches_torchvision_filter_proposals():
  torch = needs("torch")
  needs("torchvision")
  from torchvision.models.detection._utils import BoxCoder
  from torchvision.models.detection.rpn import RegionProposalNetwork
  obj, deltas, anchors, image = make_case(11)
  obj[1][:3] = [-3.0, -2.0, 4.0]      # keep sigmoid away from saturated ties
  pre, post = 100, 120
  rpn = RegionProposalNetwork(None, None, 0.7, 0.3, 256, 0.5, dict(training=pre, testing=pre),
                              dict(training=post, testing=post), 0.7).eval()
  props = BoxCoder((1.0, 1.0, 1.0, 1.0)).decode_single(
      torch.from_numpy(np.concatenate(deltas)), torch.from_numpy(np.concatenate(anchors)))
  want_b, want_s = rpn.filter_proposals(props[None], torch.from_numpy(np.concatenate(obj))[None],
                                        [image], [len(a) for a in anchors])
  boxes, scores, valid = run(obj, deltas, anchors, image, pre, post)
  n = len(want_b[0])
  assert valid.sum() == n
  np.testing.assert_allclose(boxes[:n], want_b[0].numpy(), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(scores[:n], want_s[0].numpy(), rtol=1e-6)
