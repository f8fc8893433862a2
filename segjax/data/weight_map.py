"""The U-Net loss weight map (Ronneberger et al. 2015, eq. 2), computed on the host.

numpy/scipy code that runs in the input pipeline (tf.numpy_function) and
writes the per-pixel weights that the "unet_weighted" loss reads from
`batch["weight"]`: class-balancing weights plus a border term that is high
on the thin background gaps between touching objects.
"""
from typing import Optional

import numpy as np
from scipy import ndimage

from segjax.errors import ConfigError, DataError


def balanced_class_weights(label: np.ndarray,
                           ignore_index: int = 255) -> np.ndarray:
  """Per-pixel class-balancing weights w_c(x) for one label map (numpy).

  Each class present gets n_counted / (n_classes_present * n_c), so every
  class carries the same total weight and the mean weight over counted
  pixels is 1 (scikit-learn's "balanced" heuristic).

  Args:
    label: [H, W] int label map.
    ignore_index: label value that gets weight 0.

  Returns:
    [H, W] float32 weights; 0 at ignored pixels.
  """
  label = np.asarray(label)
  counted = label != ignore_index
  classes, counts = np.unique(label[counted], return_counts=True)
  weight_of = counted.sum() / (len(classes) * counts.astype(np.float64))
  weights = np.zeros(label.shape, np.float32)
  if len(classes):
    weights[counted] = weight_of[np.searchsorted(classes, label[counted])]
  return weights


def unet_weight_map(label: np.ndarray,
                    w0: float = 10.0,
                    sigma: float = 5.0,
                    class_weights: Optional[str] = "balanced",
                    ignore_index: int = 255,
                    background: int = 0) -> np.ndarray:
  """The U-Net loss weight map (Ronneberger et al. 2015, eq. 2), on the host.

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

  d1 and d2 are the Euclidean distances from pixel x to the nearest and the
  second-nearest object. Objects are the connected components (4-connected)
  of each foreground class, so two touching objects of different classes are
  still two objects. The border term only applies to background pixels: it
  makes the network learn the thin background gaps that separate touching
  objects. With fewer than two objects there is no gap and no border term.

  The cost is one distance transform per object, O(objects * H * W); it runs
  in the input pipeline (or once, offline, for datasets of a few images).

  Args:
    label: [H, W] int label map.
    w0: weight of the border term (10 in the paper).
    sigma: its length scale in pixels (about 5 in the paper).
    class_weights: "balanced" for w_c balancing the class frequencies of this
      map (see `balanced_class_weights`), or None for w_c = 1.
    ignore_index: label value that gets weight 0.
    background: the class that separates objects.

  Returns:
    [H, W] float32 weights; 0 at ignored pixels.
  """
  label = np.asarray(label)
  if label.ndim != 2:
    raise DataError(f"unet_weight_map takes one [H, W] label map, got shape "
                    f"{label.shape}; call it once per example.")
  counted = label != ignore_index
  if class_weights == "balanced":
    weights = balanced_class_weights(label, ignore_index)
  elif class_weights is None:
    weights = counted.astype(np.float32)
  else:
    raise ConfigError(f"class_weights={class_weights!r} is not supported; "
                      "use 'balanced' or None.")

  # Running smallest and second-smallest distance over all objects, so memory
  # stays at two [H, W] maps however many objects there are.
  d1 = np.full(label.shape, np.inf)
  d2 = np.full(label.shape, np.inf)
  foreground = counted & (label != background)
  for cls in np.unique(label[foreground]):
    components, count = ndimage.label(label == cls)
    for i in range(1, count + 1):
      # distance_transform_edt measures the distance to the nearest zero, so
      # the object is the zero set.
      dist = ndimage.distance_transform_edt(components != i)
      d2 = np.where(dist < d1, d1, np.minimum(d2, dist))
      d1 = np.minimum(d1, dist)
  if np.isfinite(d2).any():
    border = w0 * np.exp(-np.square(d1 + d2) / (2.0 * sigma**2))
    weights = weights + np.where(counted & (label == background), border, 0.0)
  return weights.astype(np.float32)


# ----------------------------------------------------------------------------
# Registry: name -> loss_fn(outputs, batch) -> scalar.
