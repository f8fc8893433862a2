"""Tests for segjax.coco_eval: hand-computed APs and a naive numpy COCO AP.

The naive reference follows the COCO detection evaluation as documented
(cocodataset.org/#detection-eval): per class, detections sorted by score are
greedily matched to the unmatched ground truth of highest IoU >= t in their
image; precision is made monotone and read at the 101 recall points
0, 0.01, ..., 1 (0 past the highest recall reached); AP is their mean, then
the mean over classes with ground truth (and over t in 0.5:0.05:0.95).
"""
import json
import math
import pickle

import numpy as np
import pytest

from segjax.coco_eval import CocoEvaluator

STATS = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large",
         "ar1", "ar10", "ar100", "ar_small", "ar_medium", "ar_large")


def rect(h, w, x1, y1, x2, y2):
  """[H, W] bool mask of the pixel rectangle [x1, x2) x [y1, y2)."""
  m = np.zeros((h, w), bool)
  m[y1:y2, x1:x2] = True
  return m


def add_image(ev, image_id, h, w, gt, dets=(), crowd=None):
  """gt: list of (class, (x1, y1, x2, y2)) integer rectangles whose mask is
  the box itself; dets: list of (class, score, box) likewise."""
  ev.add_ground_truth(
      image_id, h, w,
      boxes=np.array([b for _, b in gt], np.float32).reshape(-1, 4),
      classes=np.array([c for c, _ in gt], np.int32),
      masks=np.stack([rect(h, w, *b) for _, b in gt]) if gt
      else np.zeros((0, h, w), np.uint8),
      crowd=np.zeros(len(gt), bool) if crowd is None else np.array(crowd))
  if dets:
    ev.add_detections(
        image_id,
        boxes=np.array([b for _, _, b in dets], np.float32),
        scores=np.array([s for _, s, _ in dets], np.float32),
        classes=np.array([c for c, _, _ in dets], np.int32),
        masks=np.stack([rect(h, w, *b) for _, _, b in dets]))


def assert_same_summary(a, b, tol=1e-12):
  assert a.keys() == b.keys()
  for key in a:
    va, vb = np.asarray(a[key], float), np.asarray(b[key], float)
    np.testing.assert_allclose(va, vb, atol=tol, rtol=0, equal_nan=True,
                               err_msg=key)


# --- 1. Perfect detections -----------------------------------------------------

# (image_id, H, W, [(class, box)], crowd flags): a large (100x100), a small
# (10x10), two medium (40x40, 35x30) objects, a crowd region, an empty image.
PERFECT = [
    (1, 128, 128, [(1, (10, 10, 110, 110)), (2, (112, 5, 122, 15)),
                   (1, (100, 112, 128, 128))], [False, False, True]),
    (2, 64, 80, [(2, (5, 5, 45, 45)), (1, (45, 20, 80, 50))],
     [False, False]),
    (3, 50, 50, [], []),
]


def perfect_evaluator(crowd_is_crowd=True, detect_in_crowd=False):
  ev = CocoEvaluator(num_classes=4)   # classes 1..3; class 3 has no GT
  for image_id, h, w, gt, crowd in PERFECT:
    # Detections = the non-crowd ground truth, score 1.
    dets = [(c, 1.0, b) for (c, b), is_crowd in zip(gt, crowd) if not is_crowd]
    if detect_in_crowd and image_id == 1:
      dets.append((1, 0.99, (105, 115, 125, 127)))   # inside the crowd region
    add_image(ev, image_id, h, w, gt, dets,
              [c and crowd_is_crowd for c in crowd])
  return ev


@pytest.mark.parametrize("detect_in_crowd", [False, True])
def test_perfect_detections_give_ap_one(detect_in_crowd):
  s = perfect_evaluator(detect_in_crowd=detect_in_crowd).summary()
  for prefix in ("box", "mask"):
    for name in STATS:
      assert s[f"{prefix}_{name}"] == pytest.approx(1.0, abs=1e-6), name
    np.testing.assert_allclose(s[f"{prefix}_per_class_ap"][:2], 1.0, atol=1e-6)
    assert math.isnan(s[f"{prefix}_per_class_ap"][2])   # no GT of class 3
  assert s["num_images"] == 3
  assert s["num_detections"] == 4 + detect_in_crowd


def test_crowd_region_not_a_miss_but_plain_object_is():
  # Control: the same region as an ordinary object is missed -> AP < 1.
  s = perfect_evaluator(crowd_is_crowd=False).summary()
  assert s["box_ap"] < 0.99 and s["mask_ap"] < 0.99
  assert s["box_ar100"] < 1.0


# --- 2. Hand-checked values ----------------------------------------------------

GT_TWO = [(1, (10, 10, 40, 40)), (1, (60, 60, 90, 90))]
TP = (1, (10, 10, 40, 40))
FP = (1, (0, 70, 20, 95))   # overlaps nothing


@pytest.mark.parametrize("tp_score,fp_score,expected", [
    # Sorted: TP, FP -> recall [.5, .5], precision [1, .5]; interpolated
    # precision is 1 at the 51 recall points 0..0.50 and 0 at the other 50.
    (0.9, 0.8, 51 / 101),
    # Sorted: FP, TP -> recall [0, .5], precision [0, .5]; the envelope is
    # .5 at recall 0..0.50, then 0.
    (0.8, 0.9, 0.5 * 51 / 101),
])
def test_hand_computed_ap(tp_score, fp_score, expected):
  ev = CocoEvaluator(num_classes=2, class_names=["background", "thing"])
  add_image(ev, 7, 100, 100, GT_TWO,
            [(TP[0], tp_score, TP[1]), (FP[0], fp_score, FP[1])])
  s = ev.summary()
  for prefix in ("box", "mask"):
    # IoU is exactly 1, so every threshold gives the same AP.
    # Both objects are 30x30 = 900 px < 32^2: "small"; none medium / large.
    for name in ("ap", "ap50", "ap75", "ap_small"):
      assert s[f"{prefix}_{name}"] == pytest.approx(expected, abs=1e-9)
    assert s[f"{prefix}_ar100"] == pytest.approx(0.5)
    assert s[f"{prefix}_per_class_ap"] == [pytest.approx(expected, abs=1e-9)]
    assert math.isnan(s[f"{prefix}_ap_medium"])
    assert math.isnan(s[f"{prefix}_ap_large"])


def test_partial_iou_counts_only_lower_thresholds():
  # GT 10x10, detection its 8x8 corner: IoU 0.64 >= t only for t = .5, .55,
  # .6, so AP@[.5:.95] = 3/10 with AP50 = 1 and AP75 = 0.
  ev = CocoEvaluator(num_classes=2)
  add_image(ev, 1, 20, 20, [(1, (0, 0, 10, 10))], [(1, 0.5, (0, 0, 8, 8))])
  s = ev.summary()
  for prefix in ("box", "mask"):
    assert s[f"{prefix}_ap"] == pytest.approx(0.3, abs=1e-9)
    assert s[f"{prefix}_ap50"] == pytest.approx(1.0)
    assert s[f"{prefix}_ap75"] == pytest.approx(0.0)


def test_box_and_mask_iou_are_separate():
  # Identical boxes (box IoU 1) but the detected mask covers 8x9 = 72 of the
  # 100 ground-truth pixels (mask IoU .72): box AP 1, mask AP 5/10
  # (t = .5 .. .7 match).
  h = w = 20
  ev = CocoEvaluator(num_classes=2)
  ev.add_ground_truth(1, h, w, [[0, 0, 10, 10]], [1],
                      rect(h, w, 0, 0, 10, 10)[None].astype(np.uint8), [False])
  ev.add_detections(1, [[0, 0, 10, 10]], [0.7], [1],
                    rect(h, w, 0, 0, 8, 9)[None])
  s = ev.summary()
  assert s["box_ap"] == pytest.approx(1.0)
  assert s["mask_ap"] == pytest.approx(0.5, abs=1e-9)
  assert s["mask_ap50"] == pytest.approx(1.0)
  assert s["mask_ap75"] == pytest.approx(0.0)


# --- 3. Against a naive reimplementation ----------------------------------------

def random_case(seed, n_images=8, k=3):
  """Random images with jittered / misclassified / missing detections and
  false positives. Masks are the boxes' pixel rectangles with ~10% of the
  pixels dropped, so box IoU and mask IoU differ."""
  rng = np.random.default_rng(seed)
  images = []
  for image_id in range(1, n_images + 1):
    h, w = (int(v) for v in rng.integers(30, 60, size=2))

    def random_object(x1=None, y1=None):
      x1 = rng.integers(0, w - 10) if x1 is None else x1
      y1 = rng.integers(0, h - 10) if y1 is None else y1
      x2 = rng.integers(x1 + 8, w + 1)
      y2 = rng.integers(y1 + 8, h + 1)
      mask = rect(h, w, x1, y1, x2, y2) & (rng.random((h, w)) > 0.1)
      mask[y1, x1] = True
      return np.array([x1, y1, x2, y2], float), mask

    gt = []
    for _ in range(rng.integers(0, 6)):
      box, mask = random_object()
      gt.append((int(rng.integers(1, k + 1)), box, mask))
    dets = []
    for c, box, mask in gt:
      if rng.random() < 0.8:
        jitter = box + rng.normal(0, 1.5, 4)
        jitter[2:] = np.maximum(jitter[2:], jitter[:2] + 1)
        dy, dx = rng.integers(-1, 2, size=2)
        shifted = np.zeros_like(mask)
        shifted[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = (
            mask[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)])
        cls = c if rng.random() < 0.85 else int(rng.integers(1, k + 1))
        dets.append((cls, float(rng.random()), jitter, shifted))
    for _ in range(rng.integers(0, 3)):
      box, mask = random_object()
      dets.append((int(rng.integers(1, k + 1)), float(rng.random()), box, mask))
    images.append((image_id, h, w, gt, dets))
  return images


def fill(ev, images, detection_masks=True):
  for image_id, h, w, gt, dets in images:
    ev.add_ground_truth(
        image_id, h, w,
        np.array([b for _, b, _ in gt]).reshape(-1, 4),
        np.array([c for c, _, _ in gt], int),
        np.stack([m for _, _, m in gt]) if gt else np.zeros((0, h, w), bool),
        np.zeros(len(gt), bool))
    if dets:
      ev.add_detections(
          image_id, np.array([b for _, _, b, _ in dets]),
          np.array([s for _, s, _, _ in dets]),
          np.array([c for c, _, _, _ in dets]),
          np.stack([m for _, _, _, m in dets]) if detection_masks else None)


def box_iou(a, b):
  """(x1, y1, x2, y2) boxes, continuous coordinates (no +1)."""
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


def mask_iou(a, b):
  union = np.logical_or(a, b).sum()
  return float(np.logical_and(a, b).sum()) / float(union) if union else 0.0


def naive_ap(images, cls, t, use_masks):
  """AP of one class at IoU threshold t (no crowds, area range "all")."""
  n_gt = sum(c == cls for _, _, _, gt, _ in images for c, _, _ in gt)
  if n_gt == 0:
    return math.nan
  hits = []   # (score, true positive?)
  for _, _, _, gt, dets in images:
    gts = [(b, m) for c, b, m in gt if c == cls]
    mine = sorted([d for d in dets if d[0] == cls], key=lambda d: -d[1])[:100]
    taken = [False] * len(gts)
    for _, score, box, mask in mine:
      best, best_iou = -1, t
      for j, (gb, gm) in enumerate(gts):
        iou = mask_iou(mask, gm) if use_masks else box_iou(box, gb)
        if not taken[j] and iou >= best_iou:
          best, best_iou = j, iou
      if best >= 0:
        taken[best] = True
      hits.append((score, best >= 0))
  hits.sort(key=lambda h: -h[0])
  tp = np.cumsum([h for _, h in hits]).astype(float)
  fp = np.cumsum([not h for _, h in hits]).astype(float)
  recall = tp / n_gt
  precision = tp / np.maximum(tp + fp, 1)
  points = []
  for r in np.linspace(0, 1, 101):
    reached = precision[recall >= r]
    points.append(reached.max() if reached.size else 0.0)
  return float(np.mean(points))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_naive_coco_ap(seed):
  k = 3
  images = random_case(seed, k=k)
  ev = CocoEvaluator(num_classes=k + 1)
  fill(ev, images)
  s = ev.summary()
  thresholds = np.linspace(0.5, 0.95, 10)
  for prefix, use_masks in (("box", False), ("mask", True)):
    table = np.array([[naive_ap(images, c, t, use_masks) for t in thresholds]
                      for c in range(1, k + 1)])   # [K, T]
    per_class = table.mean(axis=1)
    assert s[f"{prefix}_ap50"] == pytest.approx(np.nanmean(table[:, 0]),
                                                abs=1e-9)
    assert s[f"{prefix}_ap75"] == pytest.approx(np.nanmean(table[:, 5]),
                                                abs=1e-9)
    assert s[f"{prefix}_ap"] == pytest.approx(np.nanmean(per_class), abs=1e-9)
    np.testing.assert_allclose(s[f"{prefix}_per_class_ap"], per_class,
                               atol=1e-9, equal_nan=True)
  # The case is not degenerate: some but not all detections are right.
  assert 0.05 < s["box_ap50"] < 0.99 and 0.05 < s["mask_ap"] < 0.99


# --- 4. Multi-host state / merge ------------------------------------------------

def test_merge_equals_single_evaluator():
  images = random_case(5, n_images=8)
  whole = CocoEvaluator(num_classes=4)
  fill(whole, images)
  host0, host1 = CocoEvaluator(num_classes=4), CocoEvaluator(num_classes=4)
  fill(host0, images[::2])
  fill(host1, images[1::2])
  state = host1.state()
  # The state travels as pickle (multihost gather) or JSON alike.
  assert json.loads(json.dumps(state)) == state
  host0.merge(pickle.loads(pickle.dumps(state)))
  assert_same_summary(host0.summary(), whole.summary())
  # Merging the same images again would count them twice.
  with pytest.raises(ValueError, match="both sides"):
    host0.merge(state)
  with pytest.raises(ValueError, match="num_classes"):
    CocoEvaluator(num_classes=3).merge(state)


# --- 5. Degenerate inputs -------------------------------------------------------

def test_no_detections_gives_zero_ap():
  ev = CocoEvaluator(num_classes=4)
  add_image(ev, 1, 64, 64, [(1, (0, 0, 40, 40)), (2, (40, 40, 50, 50))])
  add_image(ev, 2, 64, 64, [])
  s = ev.summary()
  for prefix in ("box", "mask"):
    for name in ("ap", "ap50", "ap75", "ap_small", "ap_medium",
                 "ar1", "ar10", "ar100", "ar_small", "ar_medium"):
      assert s[f"{prefix}_{name}"] == 0.0, name
    assert math.isnan(s[f"{prefix}_ap_large"])   # no large GT: undefined
    per_class = s[f"{prefix}_per_class_ap"]
    assert per_class[:2] == [0.0, 0.0] and math.isnan(per_class[2])
  assert s["num_detections"] == 0 and s["num_images"] == 2


def test_detections_of_class_without_gt_and_empty_evaluator():
  ev = CocoEvaluator(num_classes=3)
  add_image(ev, 1, 32, 32, [(1, (0, 0, 10, 10))],
            [(1, 0.9, (0, 0, 10, 10)), (2, 0.8, (5, 5, 20, 20))])
  s = ev.summary()
  # Class 2 has only a false positive and no GT: its AP is undefined and
  # leaves the mean (1.0 from class 1) alone.
  assert s["box_per_class_ap"][0] == pytest.approx(1.0)
  assert math.isnan(s["box_per_class_ap"][1])
  assert s["box_ap"] == pytest.approx(1.0)

  empty = CocoEvaluator(num_classes=3).summary()
  assert empty["num_images"] == 0
  assert all(math.isnan(empty[f"mask_{n}"]) for n in STATS)
  assert len(empty["mask_per_class_ap"]) == 2


def test_input_errors_and_quiet_output(capsys):
  ev = CocoEvaluator(num_classes=3)
  add_image(ev, 1, 16, 16, [(1, (0, 0, 8, 8))])
  with pytest.raises(ValueError, match="already"):
    add_image(ev, 1, 16, 16, [])
  with pytest.raises(ValueError, match="1..2"):
    add_image(ev, 2, 16, 16, [(3, (0, 0, 8, 8))])
  with pytest.raises(ValueError, match="threshold"):
    ev.add_detections(1, [[0, 0, 8, 8]], [0.5], [1], np.ones((1, 16, 16)))
  ev.add_detections(1, [[0, 0, 8, 8]], [0.5], [1], np.ones((1, 8, 8), bool))
  with pytest.raises(ValueError, match="original size"):
    ev.summary()

  ok = CocoEvaluator(num_classes=3)
  add_image(ok, 1, 16, 16, [(1, (0, 0, 8, 8))], [(1, 0.5, (0, 0, 8, 8))])
  ok.add_detections(9, [[0, 0, 8, 8]], [0.5], [1], np.ones((1, 16, 16), bool))
  with pytest.raises(ValueError, match="no add_ground_truth"):
    ok.summary()

  quiet = CocoEvaluator(num_classes=3)
  add_image(quiet, 1, 16, 16, [(1, (0, 0, 8, 8))], [(1, 0.5, (0, 0, 8, 8))])
  capsys.readouterr()
  quiet.summary()
  assert capsys.readouterr().out == ""
  quiet.summary(verbose=True)
  assert "Average Precision" in capsys.readouterr().out


# --- 6. Boxes alone (a detector without masks) -----------------------------------

def test_box_only_evaluator_scores_boxes_as_the_full_one():
  """iou_types=("bbox",): detections without masks, box_* keys alone, equal
  to the full evaluator's box figures (the ground truth's areas are still
  the masks', as COCO's annotations give them)."""
  images = random_case(0)
  both = CocoEvaluator(num_classes=4)
  fill(both, images)
  boxes = CocoEvaluator(num_classes=4, iou_types=("bbox",))
  fill(boxes, images, detection_masks=False)
  got = boxes.summary()
  assert_same_summary(got, {k: v for k, v in both.summary().items()
                            if not k.startswith("mask_")})
  assert 0.05 < got["box_ap"] < 0.99
  empty = CocoEvaluator(num_classes=3, iou_types=("bbox",)).summary()
  assert not any(k.startswith("mask_") for k in empty) and math.isnan(empty["box_ap"])


def test_box_only_evaluator_errors():
  with pytest.raises(ValueError, match="iou_types"):
    CocoEvaluator(num_classes=3, iou_types=("keypoints",))
  with pytest.raises(ValueError, match="iou_types"):
    CocoEvaluator(num_classes=3, iou_types=())
  both = CocoEvaluator(num_classes=3)
  add_image(both, 1, 16, 16, [(1, (0, 0, 8, 8))])
  with pytest.raises(ValueError, match="masks are needed"):
    both.add_detections(1, [[0, 0, 8, 8]], [0.5], [1])
  # Merged states must score the same: box-only detections carry no masks.
  boxes = CocoEvaluator(num_classes=3, iou_types=("bbox",))
  add_image(boxes, 2, 16, 16, [(1, (0, 0, 8, 8))])
  with pytest.raises(ValueError, match="iou_types"):
    both.merge(boxes.state())
