"""Region losses: soft Dice, soft Jaccard (IoU), Lovász-Softmax and MS-SSIM.

Unlike cross-entropy these do not decompose into a mean over pixels: they
compare whole regions (a class over the batch, or over an image). They follow
the conventions of `segjax.losses`: logits [N, H, W, K] of any float dtype are
cast to float32 first; labels [N, H, W] int with `ignore_index` (255) for
pixels that do not count; optional `pixel_weights` [N] (per example, e.g. the
mask of the examples that pad a batch) or [N, H, W]. Each loss returns a
float32 scalar, and 0 with zero gradient when no pixel is counted.

They are registered in `segjax.losses.LOSSES`; the trainer selects them with
`--config.loss.name=dice` etc.

Under `parallel.mode="pmap"` they are still computed over the whole batch,
as under jit: the train step goes through `segjax.pmap_loss.device_objective`,
which gathers the outputs for losses that are not a mean over pixels.
"""
from typing import Any, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from segjax.errors import ConfigError

Array = Any

# Wang, Simoncelli and Bovik 2003, the exponents of the five scales.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den, and 0 (with a finite gradient) where den == 0."""
  return num / jnp.where(den == 0, 1.0, den)


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of `values` where `mask`, or 0 (zero gradient) where none is."""
  mask = mask.astype(jnp.float32)
  return _safe_div(jnp.sum(values * mask), jnp.sum(mask))


def _probs_targets_weights(
    logits: Array, labels: Array, ignore_index: int,
    pixel_weights: Optional[Array],
    mode: str = "multiclass") -> Tuple[jax.Array, jax.Array, jax.Array]:
  """The inputs every region loss starts from.

  Args:
    logits: [N, H, W, K] float, any dtype.
    labels: [N, H, W] int.
    ignore_index: label value that is not counted.
    pixel_weights: None, [N] or [N, H, W].
    mode: "multiclass": softmax probabilities against the one-hot labels;
      "binary": K must be 1, sigmoid probability of the foreground (label 1)
      against labels in {0, 1}.

  Returns:
    probs [N, H, W, C] float32, targets [N, H, W, C] float32 (one-hot; 0 at
    ignored pixels) and weights [N, H, W] float32: the pixel weight, 0 for
    pixels not counted (ignored, or labels outside the classes).
  """
  logits = jnp.asarray(logits).astype(jnp.float32)
  labels = jnp.asarray(labels).astype(jnp.int32)
  num_classes = logits.shape[-1]
  if labels.shape != logits.shape[:-1]:
    raise ValueError(f"labels {labels.shape} must match logits "
                     f"{logits.shape} without the class axis")
  if mode == "multiclass":
    probs = jax.nn.softmax(logits, axis=-1)
    counted = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    targets = jax.nn.one_hot(jnp.where(counted, labels, 0), num_classes)
  elif mode == "binary":
    if num_classes != 1:
      raise ConfigError(f"mode='binary' takes one logit per pixel (the "
                        f"foreground), but the model has {num_classes} "
                        "classes; use mode='multiclass'.")
    probs = jax.nn.sigmoid(logits)
    counted = (labels != ignore_index) & ((labels == 0) | (labels == 1))
    targets = (labels == 1).astype(jnp.float32)[..., None]
  else:
    raise ConfigError(f"mode={mode!r} is not supported; use 'multiclass' or "
                      "'binary'.")
  weights = counted.astype(jnp.float32)
  if pixel_weights is not None:
    pixel_weights = jnp.asarray(pixel_weights, jnp.float32)
    if pixel_weights.ndim == 1:
      pixel_weights = pixel_weights[:, None, None]
    weights = weights * jnp.broadcast_to(pixel_weights, labels.shape)
  targets = targets * counted[..., None].astype(jnp.float32)
  return probs, targets, weights


def _region_sums(probs, targets, weights, squared=False):
  """Per-class weighted sums over batch and pixels: intersection, |p|, |g|."""
  w = weights[..., None]
  axes = (0, 1, 2)
  intersection = jnp.sum(w * probs * targets, axes)
  if squared:
    return (intersection, jnp.sum(w * probs * probs, axes),
            jnp.sum(w * targets * targets, axes))
  return intersection, jnp.sum(w * probs, axes), jnp.sum(w * targets, axes)


def _mean_over_classes(per_class, present, weights, skip_absent):
  """Mean over present (or all) classes; 0 when no pixel is counted."""
  if skip_absent:
    return _masked_mean(per_class, present)
  return jnp.where(jnp.any(weights > 0), jnp.mean(per_class), 0.0)


def dice_loss(logits: Array,
              labels: Array,
              ignore_index: int = 255,
              smooth: float = 0.0,
              eps: float = 1e-7,
              skip_absent: bool = True,
              squared: bool = False,
              mode: str = "multiclass",
              pixel_weights: Optional[Array] = None) -> jax.Array:
  """Soft Dice loss (V-Net, Milletari et al. 2016; smp's DiceLoss).

  For each class c, over all counted pixels i of the batch:

    dice_c = (2 sum_i w_i p_ic g_ic + smooth) / max(sum_i w_i (p_ic + g_ic)
             + smooth, eps)

  with p the softmax probabilities, g the one-hot labels and w the pixel
  weights; `squared=True` uses V-Net's denominator sum p^2 + sum g^2. The loss
  is the mean of 1 - dice_c over the classes present in the batch (at least
  one counted ground-truth pixel), or over all classes with
  skip_absent=False. (smp zeroes absent classes but still divides by K; the
  mean over present classes keeps the scale independent of how many classes a
  batch happens to contain.)

  Args:
    logits: [N, H, W, K] float, any dtype; computed in float32.
    labels: [N, H, W] int; `ignore_index` and labels outside [0, K) are not
      counted (in binary mode, labels outside {0, 1}).
    ignore_index: label value that is not counted.
    smooth: added to numerator and denominator (Laplace smoothing).
    eps: lower bound of the denominator.
    skip_absent: leave classes absent from the batch out of the mean.
    squared: V-Net's squared denominator.
    mode: "multiclass" (softmax over K classes) or "binary" (K = 1, sigmoid,
      Dice of the foreground).
    pixel_weights: optional [N] or [N, H, W] float, scaling each pixel's
      contribution to the sums (0 drops it).

  Returns:
    float32 scalar; 0 (with zero gradient) when no pixel is counted.
  """
  probs, targets, weights = _probs_targets_weights(
      logits, labels, ignore_index, pixel_weights, mode)
  intersection, sum_p, sum_g = _region_sums(probs, targets, weights, squared)
  dice = (2.0 * intersection + smooth) / jnp.maximum(sum_p + sum_g + smooth,
                                                     eps)
  # g is 0/1, so sum g^2 = sum g: either way it counts the class's pixels.
  return _mean_over_classes(1.0 - dice, sum_g > 0, weights, skip_absent)


def iou_loss(logits: Array,
             labels: Array,
             ignore_index: int = 255,
             smooth: float = 0.0,
             eps: float = 1e-7,
             skip_absent: bool = True,
             mode: str = "multiclass",
             pixel_weights: Optional[Array] = None) -> jax.Array:
  """Soft Jaccard ("IoU") loss, as in UNet 3+ (Huang et al. 2020).

  For each class c, over all counted pixels of the batch:

    iou_c = (sum p g + smooth) / max(sum (p + g - p g) + smooth, eps)

  and the loss is the mean of 1 - iou_c over present (or all) classes. UNet
  3+'s binary version sums over the pixels of each image; multi-class, the
  class sums run over the batch like `dice_loss`.

  Args: as `dice_loss` (without `squared`).

  Returns:
    float32 scalar; 0 (with zero gradient) when no pixel is counted.
  """
  probs, targets, weights = _probs_targets_weights(
      logits, labels, ignore_index, pixel_weights, mode)
  intersection, sum_p, sum_g = _region_sums(probs, targets, weights)
  union = sum_p + sum_g - intersection
  iou = (intersection + smooth) / jnp.maximum(union + smooth, eps)
  return _mean_over_classes(1.0 - iou, sum_g > 0, weights, skip_absent)


# ----------------------------------------------------------------------------
# Lovász-Softmax (Berman, Rannen Triki and Blaschko 2018).


def lovasz_grad(gt_sorted: Array, counted_sorted: Optional[Array] = None
                ) -> jax.Array:
  """Gradient of the Lovász extension of the Jaccard loss (Berman's Alg. 1).

  With the pixels sorted by decreasing error, entry i is the increase of the
  Jaccard loss 1 - |I|/|U| when pixel i joins the set of mispredicted pixels
  (after pixels 0..i-1):

    I_i = gts - cumsum(gt)_i,  U_i = gts + cumsum(1 - gt)_i,
    J_i = 1 - I_i / U_i,       grad = [J_0, J_1 - J_0, J_2 - J_1, ...]

  Args:
    gt_sorted: [P] {0, 1} float, foreground indicator in the order of
      decreasing error.
    counted_sorted: optional [P] {0, 1}, 0 for pixels that do not count. They
      must come last in the order; they change neither I nor U and get a zero
      gradient entry.

  Returns:
    [P] float32.
  """
  gt = jnp.asarray(gt_sorted, jnp.float32)
  counted = (jnp.ones_like(gt) if counted_sorted is None
             else jnp.asarray(counted_sorted, jnp.float32))
  gt = gt * counted
  gts = jnp.sum(gt)
  intersection = gts - jnp.cumsum(gt)
  union = gts + jnp.cumsum((1.0 - gt) * counted)
  # U = 0 only when no pixel counts at all (counted pixels come first): J is
  # 0 there, rather than 0/0.
  jaccard = jnp.where(union > 0, 1.0 - _safe_div(intersection, union), 0.0)
  return jnp.concatenate([jaccard[:1], jaccard[1:] - jaccard[:-1]])


def _lovasz_flat(probs, targets, counted):
  """Per-class Lovász-Softmax of one group of pixels.

  Args:
    probs, targets: [P, C] float32; counted: [P] bool.

  Returns:
    [C] float32 losses and [C] bool "class has a counted foreground pixel".
  """
  errors = jnp.abs(targets - probs) * counted[:, None]          # [P, C]
  # Not-counted pixels sort last (key -1 < every error), so they do not move
  # the Jaccard increments of the counted ones. The permutation is a constant
  # of the gradient, as in the reference (it sorts `errors.data`).
  key = jnp.where(counted[:, None], jax.lax.stop_gradient(errors), -1.0)
  order = jnp.argsort(-key, axis=0)                              # descending
  errors_sorted = jnp.take_along_axis(errors, order, axis=0)
  gt_sorted = jnp.take_along_axis(targets, order, axis=0)
  counted_sorted = counted[order].astype(jnp.float32)            # [P, C]
  grads = jax.vmap(lovasz_grad, in_axes=(1, 1), out_axes=1)(gt_sorted,
                                                             counted_sorted)
  return jnp.sum(errors_sorted * grads, axis=0), jnp.sum(targets, axis=0) > 0


def lovasz_softmax(logits: Array,
                   labels: Array,
                   ignore_index: int = 255,
                   per_image: bool = False,
                   classes: Union[str, Sequence[int]] = "present",
                   pixel_weights: Optional[Array] = None) -> jax.Array:
  """Lovász-Softmax loss, the convex surrogate of the mean Jaccard loss.

  For each class c, with errors e_i = |g_ic - p_ic| over the counted pixels
  sorted in decreasing order, loss_c = <e_sorted, lovasz_grad(g_sorted)>: the
  Lovász extension of 1 - IoU_c, equal to it at 0/1 errors. Shapes are
  static (sorting all pixels, ignored ones last), so it is jit-safe.

  Args:
    logits: [N, H, W, K] float, any dtype; computed in float32.
    labels: [N, H, W] int; `ignore_index` and labels outside [0, K) are not
      counted.
    ignore_index: label value that is not counted.
    per_image: the loss of each image, averaged over the images with a counted
      pixel (the reference averages all images; an all-ignored image, e.g.
      batch padding, then counts as 0); else one loss over the whole batch.
    classes: "present" (mean over classes with a counted ground-truth pixel),
      "all", or a list of class ids to average over.
    pixel_weights: optional [N] or [N, H, W]; the Lovász extension has no
      per-pixel weighting, so only weight 0 (not counted) vs > 0 is used.

  Returns:
    float32 scalar; 0 (with zero gradient) when no pixel is counted.
  """
  probs, targets, weights = _probs_targets_weights(
      logits, labels, ignore_index, pixel_weights)
  n, k = probs.shape[0], probs.shape[-1]
  groups = n if per_image else 1
  probs = probs.reshape(groups, -1, k)
  targets = targets.reshape(groups, -1, k)
  counted = (weights > 0).reshape(groups, -1)
  targets = targets * counted[..., None]  # pixel weight 0: not counted
  losses, present = jax.vmap(_lovasz_flat)(probs, targets, counted)  # [G, C]
  if isinstance(classes, str):
    if classes not in ("present", "all"):
      raise ConfigError(f"classes={classes!r} is not supported; use "
                        "'present', 'all' or a list of class ids.")
    per_group = (jax.vmap(_masked_mean)(losses, present)
                 if classes == "present" else jnp.mean(losses, axis=-1))
  else:
    ids = np.asarray(classes, np.int32).reshape(-1)
    if ids.size == 0 or ids.min() < 0 or ids.max() >= k:
      raise ConfigError(f"classes={list(ids)} must be non-empty class ids in "
                        f"[0, {k}).")
    per_group = jnp.mean(losses[:, ids], axis=-1)
  return _masked_mean(per_group, jnp.any(counted, axis=-1))


# ----------------------------------------------------------------------------
# Multi-scale SSIM (Wang, Simoncelli and Bovik 2003).


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
  """[size] float32 normalised Gaussian, centred at size // 2."""
  x = np.arange(size, dtype=np.float64) - size // 2
  g = np.exp(-x**2 / (2.0 * sigma**2))
  return (g / g.sum()).astype(np.float32)


def _filter_valid(z: jax.Array, window: np.ndarray) -> jax.Array:
  """Separable 'valid' filtering of every channel: [B, H, W, D] ->
  [B, H - s + 1, W - s + 1, D] with s = len(window)."""
  d = z.shape[-1]
  s = len(window)
  dn = ("NHWC", "HWIO", "NHWC")
  # Depthwise: one group per channel, the same 1-D window along H then W.
  k_h = jnp.tile(jnp.asarray(window).reshape(s, 1, 1, 1), (1, 1, 1, d))
  k_w = k_h.reshape(1, s, 1, d)
  z = jax.lax.conv_general_dilated(z, k_h, (1, 1), "VALID",
                                   dimension_numbers=dn,
                                   feature_group_count=d,
                                   precision=jax.lax.Precision.HIGHEST)
  return jax.lax.conv_general_dilated(z, k_w, (1, 1), "VALID",
                                      dimension_numbers=dn,
                                      feature_group_count=d,
                                      precision=jax.lax.Precision.HIGHEST)


def _ssim_terms(x, y, data_range, win_size, sigma, k1, k2):
  """Mean SSIM and mean contrast-structure per (image, channel): [N, C] each.

  The window is min(win_size, H, W) wide (as the MS-SSIM code UNet 3+ uses
  does), so the coarse scales of small images still have one.
  """
  size = min(win_size, x.shape[1], x.shape[2])
  window = _gaussian_window(size, sigma)
  # One convolution for the five local moments of every channel.
  moments = _filter_valid(jnp.concatenate([x, y, x * x, y * y, x * y], -1),
                          window)
  mu_x, mu_y, xx, yy, xy = jnp.split(moments, 5, axis=-1)
  c1 = (k1 * data_range)**2
  c2 = (k2 * data_range)**2
  var_x = xx - mu_x * mu_x
  var_y = yy - mu_y * mu_y
  cov = xy - mu_x * mu_y
  # Wang's c * s with C3 = C2 / 2 collapses into one ratio.
  cs = (2.0 * cov + c2) / (var_x + var_y + c2)
  luminance = (2.0 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
  return jnp.mean(luminance * cs, axis=(1, 2)), jnp.mean(cs, axis=(1, 2))


def _avg_pool_2x(z: jax.Array) -> jax.Array:
  """2x2 average pooling, stride 2; an odd last row/column is dropped."""
  n, h, w, d = z.shape
  z = z[:, :h // 2 * 2, :w // 2 * 2]
  return z.reshape(n, h // 2, 2, w // 2, 2, d).mean(axis=(2, 4))


def ms_ssim(x: Array,
            y: Array,
            data_range: float = 1.0,
            win_size: int = 11,
            sigma: float = 1.5,
            k1: float = 0.01,
            k2: float = 0.03,
            weights: Sequence[float] = MS_SSIM_WEIGHTS,
            eps: float = 1e-6) -> jax.Array:
  """Multi-scale SSIM per image and channel (Wang et al. 2003).

    MS-SSIM = l_M^{w_M} * prod_{j=1..M} cs_j^{w_j}

  cs_j (contrast * structure) is measured at every scale j = 1..M, luminance
  l_M only at the coarsest (so the last factor is the full SSIM at scale M),
  with a Gaussian window (11, sigma 1.5, 'valid'), C1 = (K1 L)^2,
  C2 = (K2 L)^2, L = data_range, and 2x average pooling between scales. This
  is tf.image.ssim_multiscale's definition except for the window at coarse
  scales smaller than it (truncated to the image) and odd sizes (cropped
  rather than padded before pooling). Each factor is clamped below at `eps`
  before the fractional power (TF clamps at 0, where the power's gradient is
  infinite).

  Args:
    x, y: [N, H, W, C] float, values in a range of width `data_range`;
      H, W >= 2^(M-1).
    data_range: L, the width of the value range (1 for probabilities).
    win_size, sigma: the Gaussian window.
    k1, k2: the stabilising constants.
    weights: the exponent of each scale; its length is the number of scales.
    eps: lower clamp of each factor.

  Returns:
    [N, C] float32.
  """
  x = jnp.asarray(x).astype(jnp.float32)
  y = jnp.asarray(y).astype(jnp.float32)
  scales = len(weights)
  if min(x.shape[1:3]) < 2**(scales - 1):
    raise ValueError(f"MS-SSIM with {scales} scales needs images of at least "
                     f"{2**(scales - 1)} pixels a side, got {x.shape[1:3]}.")
  factors = []
  for j in range(scales):
    ssim, cs = _ssim_terms(x, y, data_range, win_size, sigma, k1, k2)
    factors.append(ssim if j == scales - 1 else cs)
    if j < scales - 1:
      x, y = _avg_pool_2x(x), _avg_pool_2x(y)
  result = 1.0
  for f, w in zip(factors, weights):
    result = result * jnp.power(jnp.maximum(f, eps), w)
  return result


def ms_ssim_loss(logits: Array,
                 labels: Array,
                 ignore_index: int = 255,
                 data_range: float = 1.0,
                 win_size: int = 11,
                 sigma: float = 1.5,
                 k1: float = 0.01,
                 k2: float = 0.03,
                 weights: Sequence[float] = MS_SSIM_WEIGHTS,
                 pixel_weights: Optional[Array] = None) -> jax.Array:
  """1 - MS-SSIM between class probabilities and one-hot labels (UNet 3+).

  MS-SSIM is computed per image and class (each class a one-channel image),
  averaged over classes, then over the images that have a counted pixel.
  Ignored pixels are set to 0 in both images, so they agree there and carry
  no error; pixel weights are used as that mask only (0 vs > 0), since SSIM is
  a windowed statistic, not a sum over pixels.

  Args:
    logits: [N, H, W, K] float, any dtype; computed in float32. H, W >= 16
      for the 5 default scales.
    labels: [N, H, W] int, `ignore_index` not counted.
    data_range, win_size, sigma, k1, k2, weights: see `ms_ssim`.
    pixel_weights: optional [N] or [N, H, W]; 0 drops a pixel.

  Returns:
    float32 scalar; 0 (with zero gradient) when no pixel is counted.
  """
  probs, targets, pixel_w = _probs_targets_weights(
      logits, labels, ignore_index, pixel_weights)
  counted = (pixel_w > 0).astype(jnp.float32)[..., None]
  scores = ms_ssim(probs * counted, targets * counted, data_range, win_size,
                   sigma, k1, k2, tuple(weights))                # [N, K]
  has_pixels = jnp.any(pixel_w > 0, axis=(1, 2))
  return _masked_mean(1.0 - jnp.mean(scores, axis=-1), has_pixels)
