"""Pixel-wise segmentation losses and the registry the trainer builds them from.

Device-side losses take logits [N, H, W, K] (any float dtype; they are cast to
float32 first, so bfloat16 models still get float32 losses) and int labels
[N, H, W] with `ignore_index` (255) for pixels that do not count. Every loss
returns a float32 scalar and is safe when a batch has no counted pixel: the
value is 0 and so is its gradient, rather than 0/0 = NaN.

`unet_weight_map` is different in kind: it is numpy/scipy code that runs on
the host, in the input pipeline, and writes the per-pixel weights that the
"unet_weighted" loss reads from `batch["weight"]`.

The trainer does not call these functions directly; it calls
`make_loss(config.loss)`, which returns `loss_fn(logits, batch) -> scalar`.
"""
import functools
import inspect
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from segjax.errors import ConfigError, DataError

Array = Any


def _broadcast_pixel_weights(weights: Array, shape: Sequence[int]) -> jax.Array:
  """[N] (per example) or [N, H, W] (per pixel) weights -> [N, H, W] float32."""
  weights = jnp.asarray(weights, jnp.float32)
  if weights.ndim == 1 and len(shape) > 1:
    weights = weights.reshape(weights.shape + (1,) * (len(shape) - 1))
  return jnp.broadcast_to(weights, shape)


def cross_entropy(logits: Array,
                  labels: Array,
                  ignore_index: int = 255,
                  class_weights: Optional[Array] = None,
                  pixel_weights: Optional[Array] = None) -> jax.Array:
  """Softmax cross-entropy, weighted mean over the counted pixels.

  The same reduction as PyTorch's
  `F.cross_entropy(logits, labels, weight=class_weights,
  ignore_index=ignore_index)`: with w_i = class_weights[y_i] * pixel_weights_i
  over counted pixels i, loss = sum_i w_i * l_i / sum_i w_i. Pixel weights thus
  set the relative importance of pixels (a U-Net weight map, or 0 for the
  examples that pad a batch); multiplying them all by a constant leaves the
  loss unchanged.

  Args:
    logits: [N, H, W, K] float, any dtype; computed in float32.
    labels: [N, H, W] int. Pixels equal to `ignore_index` are not counted, nor
      are labels outside [0, K) (PyTorch would raise; under jit we cannot, and
      the input pipeline validates labels).
    ignore_index: label value that is not counted.
    class_weights: optional [K] float, weight of each ground-truth class.
    pixel_weights: optional [N] (per example) or [N, H, W] (per pixel) float.

  Returns:
    float32 scalar; 0 (with zero gradient) when no pixel is counted.
  """
  logits = jnp.asarray(logits).astype(jnp.float32)
  labels = jnp.asarray(labels).astype(jnp.int32)
  num_classes = logits.shape[-1]
  if labels.shape != logits.shape[:-1]:
    raise ValueError(f"labels {labels.shape} must match logits "
                     f"{logits.shape} without the class axis")
  counted = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
  # Ignored pixels read class 0, then get weight 0: the gather stays in range
  # and their (finite) loss contributes nothing, not even to the gradient.
  safe_labels = jnp.where(counted, labels, 0)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  weights = counted.astype(jnp.float32)
  if class_weights is not None:
    class_weights = jnp.asarray(class_weights, jnp.float32)
    if class_weights.shape != (num_classes,):
      raise ConfigError(
          f"class_weights has shape {class_weights.shape} but the model has "
          f"{num_classes} classes; give one weight per class.")
    weights = weights * class_weights[safe_labels]
  if pixel_weights is not None:
    weights = weights * _broadcast_pixel_weights(pixel_weights, labels.shape)
  total = jnp.sum(weights)
  # Dividing by 1 where the total is 0 keeps both value and gradient at 0.
  return jnp.sum(weights * nll) / jnp.where(total > 0, total, 1.0)


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
# Registry: name -> loss_fn(logits, batch) -> scalar.


def _logits_of(outputs: Union[Array, Mapping[str, Array]]) -> Array:
  """Accepts the model's output dict or its "logits" entry."""
  if isinstance(outputs, Mapping):
    return outputs["logits"]
  return outputs


def _cross_entropy_loss(outputs, batch, ignore_index=255, class_weights=None):
  """CE on batch["label"], weighted by batch["weight"] when the batch has one.

  batch["weight"] may be per pixel [N, H, W] or per example [N], e.g. the mask
  that zeroes examples padding an eval batch.
  """
  return cross_entropy(_logits_of(outputs), batch["label"],
                       ignore_index=ignore_index, class_weights=class_weights,
                       pixel_weights=batch.get("weight"))


def _unet_weighted_loss(outputs, batch, ignore_index=255, class_weights=None):
  """CE weighted by the U-Net weight map in batch["weight"] (required)."""
  if "weight" not in batch:
    raise DataError(
        "the 'unet_weighted' loss needs a per-pixel weight map in "
        "batch['weight'] [N, H, W]; add the U-Net weight map "
        "(segjax.losses.unet_weight_map) to the input pipeline, or use the "
        "'cross_entropy' loss.")
  return cross_entropy(_logits_of(outputs), batch["label"],
                       ignore_index=ignore_index, class_weights=class_weights,
                       pixel_weights=batch["weight"])


LOSSES = {
    "cross_entropy": _cross_entropy_loss,
    "unet_weighted": _unet_weighted_loss,
}


def available() -> list:
  """Names `get_loss` accepts."""
  return sorted(LOSSES)


def get_loss(name: str, **kwargs) -> Callable[[Any, Mapping[str, Array]],
                                              jax.Array]:
  """Returns `loss_fn(logits_or_outputs, batch) -> float32 scalar`.

  Args:
    name: a key of LOSSES.
    **kwargs: the loss's options, e.g. ignore_index=255, class_weights=[...].

  Raises:
    ConfigError: for an unknown name or option.
  """
  if name not in LOSSES:
    raise ConfigError(f"unknown loss {name!r}; valid losses are: "
                      f"{', '.join(available())}.")
  fn = LOSSES[name]
  options = list(inspect.signature(fn).parameters)[2:]
  unknown = sorted(set(kwargs) - set(options))
  if unknown:
    raise ConfigError(f"loss {name!r} has no option(s) {', '.join(unknown)}; "
                      f"its options are: {', '.join(options)}.")
  if kwargs.get("class_weights") is not None:
    # A tuple from a config, converted once rather than at every trace.
    kwargs["class_weights"] = np.asarray(kwargs["class_weights"], np.float32)
  return functools.partial(fn, **kwargs)


def make_loss(
    config: Union[str, Mapping[str, Any]]) -> Callable[..., jax.Array]:
  """Builds the loss from a config entry.

  Args:
    config: a loss name, or a mapping (dict or ConfigDict) with "name" and
      optionally "kwargs", e.g. {"name": "cross_entropy",
      "kwargs": {"ignore_index": 255}}.

  Returns:
    `loss_fn(logits_or_outputs, batch) -> float32 scalar`, where batch has
    "label" [N, H, W] and optionally "weight" ([N, H, W] or [N]).
  """
  if isinstance(config, str):
    return get_loss(config)
  if not isinstance(config, Mapping) and not hasattr(config, "get"):
    raise ConfigError(f"a loss config must be a name or a mapping with 'name' "
                      f"and 'kwargs', got {type(config).__name__}.")
  name = config.get("name")
  if name is None:
    raise ConfigError("the loss config has no 'name'; set e.g. "
                      f"loss.name='cross_entropy' (valid: "
                      f"{', '.join(available())}).")
  kwargs = config.get("kwargs") or {}
  return get_loss(name, **dict(kwargs))
