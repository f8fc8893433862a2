"""Box ops vs numpy definitions and torchvision."""
import math

import numpy as np
import pytest

import jax
from jax.test_util import check_grads

from conftest import needs
from segjax.errors import ConfigError
from segjax.ops import (BBOX_XFORM_CLIP, batched_nms, box_area, box_iou, clip_boxes,
                        decode_boxes, encode_boxes, generate_anchors, nms)

# Against torchvision's BoxCoder (no README figure). Measured: decoding
# equal, encoding within 2.4e-7 of deltas up to 5e2 (the same float32
# operations); relative, so the bound scales with the deltas.
TORCHVISION_BOX_CODER_RTOL = 1e-6


def rand_boxes(rng, n, size=100.0):
  xy = rng.uniform(0, size, (n, 2))
  wh = rng.uniform(1, size / 3, (n, 2))
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def ref_iou(a, b):
  out = np.zeros((len(a), len(b)))
  for i, p in enumerate(a):
    for j, q in enumerate(b):
      iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
      ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
      inter = iw * ih
      out[i, j] = inter / ((p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter)
  return out


def ref_nms(boxes, scores, thr, classes=None):
  """The greedy loop: best remaining box, drop boxes overlapping it by > thr."""
  order = list(np.argsort(-scores, kind="stable"))
  keep = []
  while order:
    i = order.pop(0)
    keep.append(i)
    order = [j for j in order
             if not (ref_iou(boxes[i:i + 1], boxes[j:j + 1])[0, 0] > thr
                     and (classes is None or classes[i] == classes[j]))]
  return keep


def test_area_iou_clip():
  rng = np.random.RandomState(0)
  a, b = rand_boxes(rng, 7), rand_boxes(rng, 5)
  np.testing.assert_allclose(box_area(a), (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]), rtol=1e-6)
  np.testing.assert_allclose(jax.jit(box_iou)(a, b), ref_iou(a, b), atol=1e-6)
  c = np.asarray(clip_boxes(a * 2 - 50, (60, 80)))
  assert c[:, 0::2].min() >= 0 and c[:, 0::2].max() <= 80
  assert c[:, 1::2].min() >= 0 and c[:, 1::2].max() <= 60


def test_encode_decode_roundtrip_and_clamp():
  rng = np.random.RandomState(1)
  anchors, gt = rand_boxes(rng, 20), rand_boxes(rng, 20)
  w = (10.0, 10.0, 5.0, 5.0)
  d = np.asarray(jax.jit(lambda g, a: encode_boxes(g, a, w))(gt, anchors))
  aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
  gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
  np.testing.assert_allclose(d[:, 0], 10 * ((gt[:, 0] + gw / 2) - (anchors[:, 0] + aw / 2)) / aw,
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(d[:, 3], 5 * np.log(gh / ah), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(decode_boxes(d, anchors, w), gt, atol=1e-3)
  big = decode_boxes(np.array([[0, 0, 100.0, 100.0]], np.float32), anchors[:1])
  np.testing.assert_allclose(big[0, 2] - big[0, 0], aw[0] * math.exp(BBOX_XFORM_CLIP), rtol=1e-5)
  check_grads(lambda x: decode_boxes(x, anchors[:3], w), (d[:3],), order=1, modes=["rev"],
              atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_nms_matches_greedy_loop(thr):
  rng = np.random.RandomState(2)
  boxes = rand_boxes(rng, 120, 60.0)
  scores = rng.permutation(120).astype(np.float32) / 120
  want = ref_nms(boxes, scores, thr)
  idx, valid = jax.jit(lambda b, s: nms(b, s, thr, 150))(boxes, scores)
  assert int(valid.sum()) == len(want)
  np.testing.assert_array_equal(np.asarray(idx)[np.asarray(valid)], want)
  # Fewer slots than survivors: the first max_output of the same list.
  idx, valid = nms(boxes, scores, thr, 5)
  np.testing.assert_array_equal(idx, want[:5])
  assert bool(valid.all())


def test_batched_nms_and_vmap():
  rng = np.random.RandomState(3)
  boxes = rand_boxes(rng, 80, 40.0)
  scores = rng.permutation(80).astype(np.float32)
  classes = rng.randint(0, 3, 80)
  want = ref_nms(boxes, scores, 0.5, classes)
  idx, valid = jax.jit(lambda b, s, c: batched_nms(b, s, c, 0.5, 80))(boxes, scores, classes)
  np.testing.assert_array_equal(np.asarray(idx)[np.asarray(valid)], want)
  batched = jax.vmap(lambda b, s: nms(b, s, 0.5, 80))(np.stack([boxes, boxes + 1]),
                                                      np.stack([scores, scores]))
  np.testing.assert_array_equal(batched[0][0], batched[0][1])
  with pytest.raises(ConfigError):
    nms(boxes, scores[:3], 0.5, 10)


def test_anchors_match_definition():
  a = np.asarray(generate_anchors([(2, 3), (1, 2)], [8, 16], [(32,), (64, 128)],
                                  [(0.5, 1.0, 2.0), (1.0,)]))
  assert a.shape == (2 * 3 * 3 + 1 * 2 * 2, 4)
  # Level 0, location (y=1, x=2), ratio 0.5: h = 32 * sqrt(.5), w = 32 / sqrt(.5).
  hr = math.sqrt(0.5)
  base = np.round(np.array([-32 / hr, -32 * hr, 32 / hr, 32 * hr]) / 2)
  np.testing.assert_allclose(a[(1 * 3 + 2) * 3 + 0], base + [16, 8, 16, 8])
  np.testing.assert_allclose(a[18 + 3], [-64 + 16, -64, 64 + 16, 64])


def test_matches_torchvision():
  torch = needs("torch")
  tvo = needs("torchvision.ops")
  from torchvision.models.detection.anchor_utils import AnchorGenerator
  from torchvision.models.detection.image_list import ImageList
  from torchvision.models.detection._utils import BoxCoder
  rng = np.random.RandomState(4)
  boxes = rand_boxes(rng, 500, 200.0)
  scores = rng.rand(500).astype(np.float32)
  classes = rng.randint(0, 5, 500)
  np.testing.assert_allclose(box_iou(boxes[:50], boxes[50:90]),
                             tvo.box_iou(torch.from_numpy(boxes[:50]),
                                         torch.from_numpy(boxes[50:90])).numpy(), atol=1e-6)
  for thr in (0.3, 0.5, 0.7):
    want = tvo.nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr).numpy()
    idx, valid = nms(boxes, scores, thr, 500)
    np.testing.assert_array_equal(np.asarray(idx)[np.asarray(valid)], want)
    want = tvo.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                           torch.from_numpy(classes), thr).numpy()
    idx, valid = batched_nms(boxes, scores, classes, thr, 500)
    np.testing.assert_array_equal(np.asarray(idx)[np.asarray(valid)], want)
  coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
  anchors = rand_boxes(rng, 30, 200.0)
  d = coder.encode_single(torch.from_numpy(boxes[:30]), torch.from_numpy(anchors)).numpy()
  np.testing.assert_allclose(encode_boxes(boxes[:30], anchors, coder.weights), d,
                             rtol=TORCHVISION_BOX_CODER_RTOL, atol=1e-6)
  dec = coder.decode_single(torch.from_numpy(d * 3), torch.from_numpy(anchors)).numpy()
  np.testing.assert_allclose(decode_boxes(d * 3, anchors, coder.weights), dec,
                             rtol=TORCHVISION_BOX_CODER_RTOL, atol=1e-6)
  sizes = ((32,), (64,), (128,))
  ratios = ((0.5, 1.0, 2.0),) * 3
  gen = AnchorGenerator(sizes, ratios)
  fmaps = [torch.zeros(1, 1, 64 // s, 96 // s) for s in (4, 8, 16)]
  want = gen(ImageList(torch.zeros(1, 3, 64, 96), [(64, 96)]), fmaps)[0].numpy()
  got = generate_anchors([(16, 24), (8, 12), (4, 6)], [4, 8, 16], sizes, ratios)
  np.testing.assert_allclose(got, want)
