"""Semantic segmentation metrics: a confusion matrix on device, scores on host.

The split follows how evaluation runs: `confusion_matrix` is pure jax.numpy,
so it is jit-compiled inside the eval step and summed over batches (and over
devices) as a small [K, K] int32 array; only that array leaves the device, and
`scores` turns it into mIoU and friends with numpy at the end of evaluation.

Conventions (those of the PASCAL VOC / Cityscapes evaluation code):
  * rows are ground truth, columns are predictions;
  * pixels whose label is `ignore_index` (255) or outside [0, K) are not
    counted, and neither are pixels of padded examples (`weights` == 0);
  * a class that appears neither in the ground truth nor in the predictions
    has an undefined IoU: NaN in `per_class_iou`, left out of the mean.
"""
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = Any


def confusion_matrix(labels: Array,
                     predictions: Array,
                     num_classes: int,
                     ignore_index: int = 255,
                     weights: Optional[Array] = None) -> jax.Array:
  """Counts (ground truth, prediction) pairs over all counted pixels.

  Pure jax.numpy and jit-safe (`num_classes` and `ignore_index` are static
  Python ints). Built with one segment_sum over K*K bins, whose cost is
  O(pixels), instead of a [pixels, K, K] one-hot product.

  Args:
    labels: [N, H, W] int ground truth; `ignore_index` or any value outside
      [0, num_classes) marks a pixel that is not counted.
    predictions: [N, H, W] int predicted classes, e.g. argmax of the logits.
      Values outside [0, num_classes) are not counted either (an argmax never
      produces them; the guard keeps a bad value from landing in another row).
    num_classes: K.
    ignore_index: label value that is not counted.
    weights: optional [N] or [N, H, W] 0/1 mask; pixels (or whole examples)
      whose weight is 0 are not counted. Eval uses it to drop the examples
      that pad the last batch.

  Returns:
    [K, K] int32; entry [i, j] is the number of counted pixels of true class i
    predicted as class j.
  """
  k = int(num_classes)
  labels = jnp.asarray(labels).astype(jnp.int32)
  predictions = jnp.asarray(predictions).astype(jnp.int32)
  if labels.shape != predictions.shape:
    raise ValueError(f"labels {labels.shape} and predictions "
                     f"{predictions.shape} must have the same shape")
  counted = ((labels != ignore_index) & (labels >= 0) & (labels < k)
             & (predictions >= 0) & (predictions < k))
  if weights is not None:
    weights = jnp.asarray(weights)
    if weights.ndim == 1 and labels.ndim > 1:
      # Per-example mask: broadcast over the pixels of each example.
      weights = weights.reshape(weights.shape + (1,) * (labels.ndim - 1))
    counted = counted & (jnp.broadcast_to(weights, labels.shape) != 0)
  # Uncounted pixels go to bin 0 with a count of 0, so every index is in range
  # and the output size stays static.
  bins = jnp.where(counted, labels * k + predictions, 0).reshape(-1)
  counts = jax.ops.segment_sum(
      counted.astype(jnp.int32).reshape(-1), bins, num_segments=k * k)
  return counts.reshape(k, k)


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  """num / den elementwise, NaN where den == 0, without numpy warnings."""
  out = np.full(np.shape(num), np.nan, dtype=np.float64)
  np.divide(num, den, out=out, where=den > 0)
  return out


def _nanmean(x: np.ndarray) -> float:
  """Mean over the non-NaN entries; NaN when there are none (no warning)."""
  finite = ~np.isnan(x)
  return float(x[finite].mean()) if finite.any() else float("nan")


def scores(cm: Array) -> dict:
  """Standard segmentation scores from a confusion matrix.

  Args:
    cm: [K, K] confusion matrix (rows ground truth, columns prediction), e.g.
      the sum over eval batches of `confusion_matrix`; any numeric array.

  Returns:
    A dict of Python floats / lists (JSON-ready for metrics.jsonl):
      miou: mean of `per_class_iou` over the classes where it is defined.
      per_class_iou: list of K floats, TP / (TP + FP + FN); NaN for a class
        absent from both ground truth and predictions.
      pixel_accuracy: sum(TP) / counted pixels.
      mean_accuracy: mean over classes present in the ground truth of
        TP / ground-truth pixels (per-class recall).
      per_class_accuracy: list of K floats, NaN for classes absent from the
        ground truth.
      fw_iou: frequency-weighted IoU, sum over classes of
        (ground-truth pixels / counted pixels) * IoU.
    Every value is NaN when `cm` counts no pixel at all.
  """
  cm = np.asarray(cm, dtype=np.float64)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
    raise ValueError(f"confusion matrix must be [K, K], got {cm.shape}")
  tp = np.diag(cm)
  gt = cm.sum(axis=1)
  pred = cm.sum(axis=0)
  total = cm.sum()
  iou = _safe_divide(tp, gt + pred - tp)
  acc = _safe_divide(tp, gt)
  if total > 0:
    freq = gt / total
    # A class absent from the ground truth has weight 0; its IoU (0 or NaN)
    # must not turn the weighted sum into NaN.
    fw_iou = float(np.sum(freq[gt > 0] * iou[gt > 0]))
    pixel_accuracy = float(tp.sum() / total)
  else:
    fw_iou = pixel_accuracy = float("nan")
  return {
      "miou": _nanmean(iou),
      "per_class_iou": [float(v) for v in iou],
      "pixel_accuracy": pixel_accuracy,
      "mean_accuracy": _nanmean(acc),
      "per_class_accuracy": [float(v) for v in acc],
      "fw_iou": fw_iou,
  }
