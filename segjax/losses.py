"""Pixel-wise segmentation losses and the registry the trainer builds them from.

Device-side losses take logits [N, H, W, K] (any float dtype; they are cast to
float32 first, so bfloat16 models still get float32 losses) and int labels
[N, H, W] with `ignore_index` (255) for pixels that do not count. Every loss
returns a float32 scalar and is safe when a batch has no counted pixel: the
value is 0 and so is its gradient, rather than 0/0 = NaN.

The U-Net weight map the "unet_weighted" loss reads from `batch["weight"]`
is computed on the host, in the input pipeline (segjax.data.weight_map).

The region losses (soft Dice, soft IoU, Lovász-Softmax, MS-SSIM) live in
`segjax.region_losses` and are re-exported here.

The trainer does not call these functions directly; it calls
`make_loss(config.loss)`, which returns `loss_fn(outputs, batch) -> scalar`.
"""
import functools
import inspect
import numbers
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from segjax.errors import ConfigError, DataError
# Re-exported, so that segjax.losses is the one place losses are found.
from segjax.region_losses import (  # noqa: F401
    MS_SSIM_WEIGHTS, dice_loss, iou_loss, lovasz_grad, lovasz_softmax,
    ms_ssim, ms_ssim_loss)

Array = Any


def _broadcast_pixel_weights(weights: Array, shape: Sequence[int]) -> jax.Array:
  """[N] (per example) or [N, H, W] (per pixel) weights -> [N, H, W] float32."""
  weights = jnp.asarray(weights, jnp.float32)
  if weights.ndim == 1 and len(shape) > 1:
    weights = weights.reshape(weights.shape + (1,) * (len(shape) - 1))
  return jnp.broadcast_to(weights, shape)


def _mean_weights(labels: jax.Array, num_classes: int, ignore_index: int,
                  class_weights: Optional[Array] = None,
                  pixel_weights: Optional[Array] = None):
  """The weights w_i of a weighted mean over pixels, sum_i w_i l_i / sum_i w_i.

  Args:
    labels: [N, H, W] int32.
    num_classes: K; labels outside [0, K) are not counted.
    ignore_index: label value that is not counted.
    class_weights: optional [K] float, weight of each ground-truth class.
    pixel_weights: optional [N] or [N, H, W] float.

  Returns:
    weights [N, H, W] float32 (0 where not counted) and safe_labels
    [N, H, W] int32, the labels with the uncounted ones read as class 0.
  """
  counted = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
  # Ignored pixels read class 0, then get weight 0: the gather stays in range
  # and their (finite) loss contributes nothing, not even to the gradient.
  safe_labels = jnp.where(counted, labels, 0)
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
  return weights, safe_labels


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
  weights, safe_labels = _mean_weights(labels, num_classes, ignore_index,
                                       class_weights, pixel_weights)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  total = jnp.sum(weights)
  # Dividing by 1 where the total is 0 keeps both value and gradient at 0.
  return jnp.sum(weights * nll) / jnp.where(total > 0, total, 1.0)


def hard_pixel_weights(logits: Array,
                       labels: Array,
                       mode: str = "ohem",
                       thresh: float = 0.7,
                       min_kept: int = 100000,
                       top_k: float = 0.25,
                       ignore_index: int = 255) -> jax.Array:
  """The hard pixels that online hard example mining trains on, as 0/1 weights.

  mode="ohem" (mmsegmentation's OHEMPixelSampler, from PSPNet/ICNet): with
  p_i the softmax probability of pixel i's true class, keep the counted
  pixels with p_i < max(thresh, p_(m)), where p_(m) is the m-th smallest p
  over the batch and m = min(min_kept * N, n_counted - 1): every pixel the
  model is unsure of, and at least about min_kept pixels per image.
  mode="top_k" (bootstrapped CE): keep the ceil(top_k * n_counted) counted
  pixels of highest cross-entropy, ties broken by position.

  Static shapes: both sort all N*H*W pixels (ignored ones last) and mask.
  The selection is a step function of the logits: no gradient through it.

  Args:
    logits: [N, H, W, K] float, any dtype; computed in float32.
    labels: [N, H, W] int; `ignore_index` and labels outside [0, K) never count.
    mode: "ohem" or "top_k".
    thresh, min_kept: the "ohem" threshold and per-image minimum.
    top_k: the fraction of counted pixels "top_k" keeps, in (0, 1].

  Returns:
    [N, H, W] float32, 1 for the kept pixels, 0 elsewhere.
  """
  if mode not in ("ohem", "top_k"):
    raise ConfigError(f"hard pixel mode must be 'ohem' or 'top_k', got {mode!r}.")
  if mode == "top_k" and not 0 < top_k <= 1:
    raise ConfigError(f"top_k must be a fraction in (0, 1], got {top_k!r}.")
  logits = jax.lax.stop_gradient(jnp.asarray(logits).astype(jnp.float32))
  labels = jnp.asarray(labels).astype(jnp.int32)
  num_classes = logits.shape[-1]
  counted = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
  log_p = jnp.take_along_axis(jax.nn.log_softmax(logits, -1),
                              jnp.where(counted, labels, 0)[..., None], -1)[..., 0]
  n_counted = jnp.sum(counted)
  if mode == "ohem":
    p = jnp.where(counted, jnp.exp(log_p), jnp.inf)
    m = jnp.minimum(min_kept * labels.shape[0], jnp.maximum(n_counted - 1, 0))
    threshold = jnp.maximum(jnp.sort(p.ravel())[m], thresh)
    return (counted & (p < threshold)).astype(jnp.float32)
  loss = jnp.where(counted, -log_p, -jnp.inf).ravel()
  rank = jnp.empty_like(loss, jnp.int32).at[jnp.argsort(-loss, stable=True)].set(
      jnp.arange(loss.size, dtype=jnp.int32))
  keep = jnp.ceil(top_k * n_counted.astype(jnp.float32)).astype(jnp.int32)
  return ((rank < keep).reshape(labels.shape) & counted).astype(jnp.float32)


def focal_loss(logits: Array,
               labels: Array,
               gamma: float = 2.0,
               alpha: Optional[Union[float, Array]] = None,
               ignore_index: int = 255,
               pixel_weights: Optional[Array] = None) -> jax.Array:
  """Softmax focal loss (Lin et al. 2017), mean over the counted pixels.

    FL_i = -alpha_t (1 - p_t)^gamma log p_t,  p_t = softmax(logits_i)[y_i]

  loss = sum_i w_i FL_i / sum_i w_i with w_i the pixel weights: unlike
  `cross_entropy`'s class weights, alpha is not in the denominator (the paper
  normalises by the number of anchors, not by the sum of alpha_t).
  gamma = 0 and alpha = None give cross-entropy.

  Args:
    logits: [N, H, W, K] float, any dtype; computed in float32.
    labels: [N, H, W] int; `ignore_index` and labels outside [0, K) are not
      counted.
    gamma: focusing parameter (a Python number, >= 0).
    alpha: None, a scalar, or [K] float: alpha_t = alpha[y_i].
    ignore_index: label value that is not counted.
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
  if gamma < 0:
    raise ConfigError(f"focal loss gamma={gamma} must be >= 0.")
  weights, safe_labels = _mean_weights(labels, num_classes, ignore_index,
                                       pixel_weights=pixel_weights)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  log_pt = jnp.take_along_axis(log_probs, safe_labels[..., None],
                               axis=-1)[..., 0]
  # 1 - p_t via expm1: exact for confident pixels, where 1 - exp() cancels.
  one_minus_pt = -jnp.expm1(log_pt)
  if gamma == 0:
    modulating = 1.0
  elif float(gamma).is_integer():
    modulating = jax.lax.integer_pow(one_minus_pt, int(gamma))
  else:
    # x^gamma has an infinite slope at x = 0 for gamma < 1; the clamp keeps
    # the gradient finite at p_t = 1 and changes the value by < 1e-12^gamma.
    modulating = jnp.power(jnp.maximum(one_minus_pt, 1e-12), gamma)
  fl = -modulating * log_pt
  if alpha is not None:
    alpha = jnp.asarray(alpha, jnp.float32)
    if alpha.ndim == 1:
      if alpha.shape != (num_classes,):
        raise ConfigError(
            f"focal alpha has shape {alpha.shape} but the model has "
            f"{num_classes} classes; give one alpha per class or a scalar.")
      alpha = alpha[safe_labels]
    fl = alpha * fl
  total = jnp.sum(weights)
  return jnp.sum(weights * fl) / jnp.where(total > 0, total, 1.0)


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


def _ohem_cross_entropy_loss(outputs, batch, mode="ohem", thresh=0.7,
                             min_kept=100000, top_k=0.25, ignore_index=255,
                             class_weights=None):
  """CE over the hard pixels only (`hard_pixel_weights`), e.g. for Cityscapes."""
  logits = _logits_of(outputs)
  hard = hard_pixel_weights(logits, batch["label"], mode, thresh, min_kept, top_k,
                            ignore_index)
  if "weight" in batch:
    hard = hard * _broadcast_pixel_weights(batch["weight"], hard.shape)
  return cross_entropy(logits, batch["label"], ignore_index=ignore_index,
                       class_weights=class_weights, pixel_weights=hard)


def _unet_weighted_loss(outputs, batch, ignore_index=255, class_weights=None):
  """CE weighted by the U-Net weight map in batch["weight"] (required)."""
  if "weight" not in batch:
    raise DataError(
        "the 'unet_weighted' loss needs a per-pixel weight map in "
        "batch['weight'] [N, H, W]; add the U-Net weight map "
        "(segjax.data.weight_map.unet_weight_map) to the input pipeline, or use the "
        "'cross_entropy' loss.")
  return cross_entropy(_logits_of(outputs), batch["label"],
                       ignore_index=ignore_index, class_weights=class_weights,
                       pixel_weights=batch["weight"])


def _focal_loss(outputs, batch, gamma=2.0, alpha=None, ignore_index=255):
  """Focal loss; batch["weight"] ([N] or [N, H, W]) weights the mean."""
  return focal_loss(_logits_of(outputs), batch["label"], gamma=gamma,
                    alpha=alpha, ignore_index=ignore_index,
                    pixel_weights=batch.get("weight"))


def _dice_loss(outputs, batch, ignore_index=255, smooth=0.0, eps=1e-7,
               skip_absent=True, squared=False, mode="multiclass"):
  """Soft Dice; batch["weight"] scales each pixel in the class sums."""
  return dice_loss(_logits_of(outputs), batch["label"],
                   ignore_index=ignore_index, smooth=smooth, eps=eps,
                   skip_absent=skip_absent, squared=squared, mode=mode,
                   pixel_weights=batch.get("weight"))


def _iou_loss(outputs, batch, ignore_index=255, smooth=0.0, eps=1e-7,
              skip_absent=True, mode="multiclass"):
  """Soft Jaccard; batch["weight"] scales each pixel in the class sums."""
  return iou_loss(_logits_of(outputs), batch["label"],
                  ignore_index=ignore_index, smooth=smooth, eps=eps,
                  skip_absent=skip_absent, mode=mode,
                  pixel_weights=batch.get("weight"))


def _lovasz_loss(outputs, batch, ignore_index=255, per_image=False,
                 classes="present"):
  """Lovász-Softmax; pixels with batch["weight"] == 0 are not counted."""
  return lovasz_softmax(_logits_of(outputs), batch["label"],
                        ignore_index=ignore_index, per_image=per_image,
                        classes=classes, pixel_weights=batch.get("weight"))


def _ms_ssim_loss(outputs, batch, ignore_index=255, data_range=1.0,
                  win_size=11, sigma=1.5, k1=0.01, k2=0.03,
                  weights=MS_SSIM_WEIGHTS):
  """1 - MS-SSIM; pixels with batch["weight"] == 0 are not counted."""
  return ms_ssim_loss(_logits_of(outputs), batch["label"],
                      ignore_index=ignore_index, data_range=data_range,
                      win_size=win_size, sigma=sigma, k1=k1, k2=k2,
                      weights=weights, pixel_weights=batch.get("weight"))


def _cgm_loss(outputs, batch, background=0, ignore_index=255):
  """UNet 3+'s classification-guided module: BCE of outputs["cls"].

  The image-level target, "is any object in the image", comes from the
  labels: (no object, object) = (1, 0) when every counted pixel is
  `background`, else (0, 1). Add it to the segmentation loss with "sum",
  e.g. terms=[("unet3p_hybrid", 1.0, {}), ("cgm", 1.0, {})].
  """
  if not isinstance(outputs, Mapping) or "cls" not in outputs:
    raise ConfigError("the 'cgm' loss needs the model's outputs['cls']; build "
                      "unet3p with cgm=True.")
  labels = batch["label"]
  foreground = (labels != background) & (labels != ignore_index)
  has_object = jnp.any(foreground.reshape(labels.shape[0], -1), axis=1)
  target = jnp.stack([~has_object, has_object], -1).astype(jnp.float32)
  logits = outputs["cls"].astype(jnp.float32).reshape(target.shape)
  return jnp.mean(jax.nn.softplus(logits) - logits * target)  # sigmoid BCE


def _unet3p_hybrid_loss(outputs, batch, ignore_index=255, gamma=2.0,
                        alpha=None, data_range=1.0):
  """UNet 3+'s hybrid loss (Huang et al. 2020, eq. 4): focal + MS-SSIM + IoU.

  Pixel-level (focal), patch-level (MS-SSIM) and map-level (IoU) terms,
  summed with weight 1 each. For other weights, use the "sum" loss.
  """
  return (_focal_loss(outputs, batch, gamma, alpha, ignore_index)
          + _ms_ssim_loss(outputs, batch, ignore_index, data_range)
          + _iou_loss(outputs, batch, ignore_index))


LOSSES = {
    "cross_entropy": _cross_entropy_loss,
    "ohem_cross_entropy": _ohem_cross_entropy_loss,
    "unet_weighted": _unet_weighted_loss,
    "focal": _focal_loss,
    "dice": _dice_loss,
    "iou": _iou_loss,
    "lovasz_softmax": _lovasz_loss,
    "ms_ssim": _ms_ssim_loss,
    "unet3p_hybrid": _unet3p_hybrid_loss,
    "cgm": _cgm_loss,
}



# The losses that are a weighted mean over pixels (or examples), sum_i w_i l_i
# / sum_i w_i, with weights that depend on the batch only, never on the model:
# name -> total(outputs, batch, **options) -> sum_i w_i, float32 scalar.
# Under pmap such a loss splits exactly: device d's mean scaled by its share
# of the total is sum_{i on d} w_i l_i / sum_i w_i, and these sum to the
# global mean (see `segjax.pmap_loss.device_objective`).
def _ce_total(outputs, batch, ignore_index=255, class_weights=None, **unused):
  logits = _logits_of(outputs)
  weights, _ = _mean_weights(jnp.asarray(batch["label"]).astype(jnp.int32),
                             logits.shape[-1], ignore_index, class_weights,
                             batch.get("weight"))
  return jnp.sum(weights)


def _focal_total(outputs, batch, ignore_index=255, **unused):
  # alpha is in the numerator only (see focal_loss).
  return _ce_total(outputs, batch, ignore_index)


def _cgm_total(outputs, batch, **unused):
  return jnp.float32(batch["label"].shape[0])  # a mean over the images


PIXEL_MEAN_TOTALS = {
    "cross_entropy": _ce_total,
    "unet_weighted": _ce_total,
    "focal": _focal_total,
    "cgm": _cgm_total,
}

# Options that are per-class arrays: converted once from a config tuple.
_ARRAY_OPTIONS = ("class_weights", "alpha")


def available() -> list:
  """Names `get_loss` accepts."""
  return sorted(LOSSES) + sorted(COMBINATORS)


def _with_aux(loss_fn, aux_weight: float, name: str):
  """loss(outputs) + aux_weight * mean of loss(aux) over outputs["aux"]."""

  def parts(outputs):
    aux = outputs.get("aux") if isinstance(outputs, Mapping) else None
    if not aux:
      raise ConfigError(
          f"loss {name!r} has aux_weight={aux_weight} but the model returned "
          "no auxiliary logits (outputs['aux']); enable the model's deep "
          "supervision / aux head, or set aux_weight=0.")
    return [(1.0, loss_fn, outputs)] + [
        (aux_weight / len(aux), loss_fn, logits) for logits in aux]

  return _weighted_sum(parts, [loss_fn])


def _weighted_sum(parts, terms):
  """loss(outputs, batch) = sum_j w_j * fn_j(outputs_j, batch).

  Args:
    parts: outputs -> [(w_j, fn_j, outputs_j)], each fn_j one of `terms`
      applied to (part of) the outputs.
    terms: the loss functions `parts` uses; `pmap_loss.device_objective`
      splits the sum into its terms when each of them splits.
  """

  def loss(outputs, batch):
    return sum(w * fn(o, batch) for w, fn, o in parts(outputs))

  loss.parts = parts
  loss.terms = tuple(terms)
  return loss


def _sum_term(term) -> tuple:
  """One entry of the "sum" loss's terms -> (name, weight, kwargs)."""
  if isinstance(term, Mapping) or hasattr(term, "get"):
    unknown = sorted(set(term) - {"name", "weight", "kwargs"})
    if "name" not in term or unknown:
      raise ConfigError(f"a 'sum' loss term must have 'name' and optionally "
                        f"'weight' and 'kwargs', got {dict(term)}.")
    return term["name"], term.get("weight", 1.0), term.get("kwargs") or {}
  if isinstance(term, (list, tuple)) and 1 <= len(term) <= 3:
    name, weight, kwargs = tuple(term) + ((1.0, {})[len(term) - 1:])
    return name, weight, kwargs or {}
  raise ConfigError(f"a 'sum' loss term must be (name, weight, kwargs) or a "
                    f"dict with those keys, got {term!r}.")


def _build_sum(terms=()):
  """The "sum" loss: sum_j weight_j * loss_j, each loss_j from the registry."""
  if not terms:
    raise ConfigError("the 'sum' loss needs terms, e.g. kwargs.terms="
                      "[('focal', 1.0, {}), ('dice', 0.5, {})].")
  built = []
  for term in terms:
    name, weight, kwargs = _sum_term(term)
    built.append((float(weight), get_loss(name, **dict(kwargs))))

  return _weighted_sum(lambda outputs: [(w, fn, outputs) for w, fn in built],
                       [fn for _, fn in built])


# name -> builder(**kwargs) -> loss_fn: losses made of registered losses.
COMBINATORS = {"sum": _build_sum}


def get_loss(name: str, **kwargs) -> Callable[[Any, Mapping[str, Array]],
                                              jax.Array]:
  """Returns `loss_fn(outputs, batch) -> float32 scalar`.

  `outputs` is the model's output dict (or its "logits" array) and batch has
  "label" [N, H, W] and optionally "weight" ([N, H, W] or [N]).

  Args:
    name: a key of LOSSES, or "sum" with `terms=[(name, weight, kwargs),
      ...]` (or dicts with those keys): the weighted sum of registered losses.
    **kwargs: the loss's options, e.g. ignore_index=255, class_weights=[...].
      Every loss also takes `aux_weight` (default 0): deep supervision, total
      = loss(outputs["logits"]) + aux_weight * mean_j loss(outputs["aux"][j]),
      the same loss on every auxiliary logits map (e.g. aux_weight=0.4 with
      torchvision's one aux head; UNet 3+'s sum over its 4 side outputs is
      aux_weight=4).

  Raises:
    ConfigError: for an unknown name or option.
  """
  if name not in LOSSES and name not in COMBINATORS:
    raise ConfigError(f"unknown loss {name!r}; valid losses are: "
                      f"{', '.join(available())}.")
  aux_weight = kwargs.pop("aux_weight", 0.0) or 0.0
  if not isinstance(aux_weight, numbers.Real) or aux_weight < 0:
    raise ConfigError(f"aux_weight={aux_weight!r} must be a number >= 0.")
  fn = LOSSES[name] if name in LOSSES else COMBINATORS[name]
  options = list(inspect.signature(fn).parameters)
  options = options[2:] if name in LOSSES else options  # past (outputs, batch)
  unknown = sorted(set(kwargs) - set(options))
  if unknown:
    options.append("aux_weight")
    raise ConfigError(f"loss {name!r} has no option(s) {', '.join(unknown)}; "
                      f"its options are: {', '.join(options)}.")
  for key in _ARRAY_OPTIONS:
    if kwargs.get(key) is not None:
      # A tuple from a config, converted once rather than at every trace.
      kwargs[key] = np.asarray(kwargs[key], np.float32)
  loss_fn = fn(**kwargs) if name in COMBINATORS else functools.partial(
      fn, **kwargs)
  if name in PIXEL_MEAN_TOTALS:
    loss_fn.pixel_total = functools.partial(PIXEL_MEAN_TOTALS[name], **kwargs)
  return _with_aux(loss_fn, float(aux_weight), name) if aux_weight else loss_fn


def make_loss(
    config: Union[str, Mapping[str, Any]]) -> Callable[..., jax.Array]:
  """Builds the loss from a config entry.

  Args:
    config: a loss name, or a mapping (dict or ConfigDict) with "name" and
      optionally "kwargs", e.g. {"name": "cross_entropy",
      "kwargs": {"ignore_index": 255}}.

  Returns:
    `loss_fn(outputs, batch) -> float32 scalar`, where outputs is the model's
    output dict (or its logits) and batch has "label" [N, H, W] and
    optionally "weight" ([N, H, W] or [N]).
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
