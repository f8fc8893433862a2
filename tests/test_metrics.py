"""Tests for segjax.metrics against naive numpy loops."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import metrics


def naive_confusion(labels, preds, k, ignore_index=255, weights=None):
  """One pixel at a time, straight from the definition."""
  labels = np.asarray(labels)
  preds = np.asarray(preds)
  cm = np.zeros((k, k), np.int64)
  for idx in np.ndindex(labels.shape):
    if weights is not None:
      w = np.asarray(weights)
      w = w[idx[0]] if w.ndim == 1 else w[idx]
      if w == 0:
        continue
    t, p = int(labels[idx]), int(preds[idx])
    if t == ignore_index or not 0 <= t < k or not 0 <= p < k:
      continue
    cm[t, p] += 1
  return cm


def naive_scores(cm):
  k = cm.shape[0]
  ious, accs = [], []
  for c in range(k):
    tp = cm[c, c]
    fp = cm[:, c].sum() - tp
    fn = cm[c, :].sum() - tp
    ious.append(tp / (tp + fp + fn) if tp + fp + fn > 0 else math.nan)
    accs.append(tp / cm[c, :].sum() if cm[c, :].sum() > 0 else math.nan)
  total = cm.sum()
  fw = sum(cm[c, :].sum() / total * ious[c] for c in range(k)
           if cm[c, :].sum() > 0)
  return {
      "miou": np.nanmean(ious),
      "per_class_iou": ious,
      "pixel_accuracy": np.trace(cm) / total,
      "mean_accuracy": np.nanmean(accs),
      "fw_iou": fw,
  }


def random_batch(rng, n=3, h=7, w=9, k=5, ignore_frac=0.2):
  labels = rng.integers(0, k, size=(n, h, w))
  labels[rng.random((n, h, w)) < ignore_frac] = 255
  preds = rng.integers(0, k, size=(n, h, w))
  return labels.astype(np.int32), preds.astype(np.int32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_matrix_matches_naive(seed):
  rng = np.random.default_rng(seed)
  labels, preds = random_batch(rng)
  cm = jax.jit(metrics.confusion_matrix, static_argnums=2)(labels, preds, 5)
  assert cm.shape == (5, 5) and cm.dtype == jnp.int32
  np.testing.assert_array_equal(cm, naive_confusion(labels, preds, 5))


def test_confusion_matrix_out_of_range_labels_not_counted():
  labels = np.array([[[0, 1, 7, -1, 255, 2]]], np.int32)
  preds = np.array([[[0, 2, 1, 1, 0, 9]]], np.int32)
  cm = metrics.confusion_matrix(labels, preds, 3)
  np.testing.assert_array_equal(cm, naive_confusion(labels, preds, 3))
  assert int(cm.sum()) == 2


@pytest.mark.parametrize("per_example", [True, False])
def test_confusion_matrix_weights(per_example):
  rng = np.random.default_rng(3)
  labels, preds = random_batch(rng, n=4)
  if per_example:
    weights = np.array([1, 0, 1, 0], np.float32)  # two padded examples
  else:
    weights = (rng.random(labels.shape) < 0.5).astype(np.float32)
  cm = jax.jit(metrics.confusion_matrix, static_argnums=2)(
      labels, preds, 5, 255, weights)
  np.testing.assert_array_equal(
      cm, naive_confusion(labels, preds, 5, weights=weights))


def test_confusion_matrix_accumulates():
  rng = np.random.default_rng(4)
  total = jnp.zeros((5, 5), jnp.int32)
  expected = np.zeros((5, 5), np.int64)
  for _ in range(3):
    labels, preds = random_batch(rng)
    total += metrics.confusion_matrix(labels, preds, 5)
    expected += naive_confusion(labels, preds, 5)
  np.testing.assert_array_equal(total, expected)


def test_confusion_matrix_custom_ignore_index():
  labels = np.array([[[0, 1, 2, 1]]], np.int32)
  preds = np.array([[[0, 1, 1, 0]]], np.int32)
  cm = metrics.confusion_matrix(labels, preds, 3, ignore_index=1)
  np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 0, 0], [0, 1, 0]])


def assert_scores_close(got, want):
  for key in ("miou", "pixel_accuracy", "mean_accuracy", "fw_iou"):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-12, err_msg=key)
  np.testing.assert_allclose(got["per_class_iou"], want["per_class_iou"],
                             rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_scores_match_naive(seed):
  rng = np.random.default_rng(seed)
  labels, preds = random_batch(rng, n=2, h=16, w=16, k=6)
  cm = np.asarray(metrics.confusion_matrix(labels, preds, 6))
  assert_scores_close(metrics.scores(cm), naive_scores(cm))


def test_scores_absent_classes_are_nan_and_left_out():
  # Class 3 appears nowhere; class 2 only in predictions (IoU 0, no accuracy).
  labels = np.array([[[0, 0, 1, 1, 1, 255]]], np.int32)
  preds = np.array([[[0, 1, 1, 1, 2, 3]]], np.int32)
  cm = np.asarray(metrics.confusion_matrix(labels, preds, 4))
  s = metrics.scores(cm)
  iou = s["per_class_iou"]
  assert math.isnan(iou[3]) and iou[2] == 0.0
  np.testing.assert_allclose(iou[:2], [1 / 2, 2 / 4])
  np.testing.assert_allclose(s["miou"], (1 / 2 + 2 / 4 + 0) / 3)
  np.testing.assert_allclose(s["mean_accuracy"], (1 / 2 + 2 / 3) / 2)
  np.testing.assert_allclose(s["pixel_accuracy"], 3 / 5)
  np.testing.assert_allclose(s["fw_iou"], 2 / 5 * 1 / 2 + 3 / 5 * 2 / 4)
  assert_scores_close(s, naive_scores(cm))


def test_scores_perfect_and_empty():
  cm = np.diag([3, 0, 5])
  s = metrics.scores(cm)
  assert s["miou"] == 1.0 and s["pixel_accuracy"] == 1.0
  assert math.isnan(s["per_class_iou"][1])
  empty = metrics.scores(np.zeros((3, 3), np.int32))
  assert all(math.isnan(empty[k]) for k in
             ("miou", "pixel_accuracy", "mean_accuracy", "fw_iou"))
