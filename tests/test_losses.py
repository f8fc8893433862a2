"""Tests for segjax.losses against numpy references."""
import math

import jax
from jax import test_util as jtu
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import losses
from segjax.data import weight_map
from segjax.errors import ConfigError, DataError


def naive_cross_entropy(logits, labels, ignore_index=255, class_weights=None,
                        pixel_weights=None):
  """PyTorch's weighted-mean CE, one pixel at a time, in float64."""
  logits = np.asarray(logits, np.float64)
  num = den = 0.0
  for idx in np.ndindex(labels.shape):
    y = int(labels[idx])
    if y == ignore_index:
      continue
    z = logits[idx]
    m = z.max()
    nll = -(z[y] - m - math.log(np.exp(z - m).sum()))
    w = 1.0 if class_weights is None else class_weights[y]
    if pixel_weights is not None:
      pw = np.asarray(pixel_weights)
      w *= pw[idx[0]] if pw.ndim == 1 else pw[idx]
    num += w * nll
    den += w
  return num / den if den > 0 else 0.0


def random_inputs(seed, n=2, h=5, w=6, k=4, ignore_frac=0.25):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(n, h, w, k)).astype(np.float32) * 3
  labels = rng.integers(0, k, size=(n, h, w)).astype(np.int32)
  labels[rng.random((n, h, w)) < ignore_frac] = 255
  return rng, logits, labels


@pytest.mark.parametrize("seed", [0, 1])
def test_cross_entropy_matches_naive(seed):
  _, logits, labels = random_inputs(seed)
  got = jax.jit(losses.cross_entropy)(logits, labels)
  assert got.dtype == jnp.float32 and got.shape == ()
  np.testing.assert_allclose(got, naive_cross_entropy(logits, labels),
                             rtol=1e-5)


def test_cross_entropy_class_and_pixel_weights():
  rng, logits, labels = random_inputs(2)
  cw = np.array([0.5, 2.0, 1.0, 3.0], np.float32)
  pw = rng.uniform(0.1, 5.0, size=labels.shape).astype(np.float32)
  got = losses.cross_entropy(logits, labels, class_weights=cw, pixel_weights=pw)
  np.testing.assert_allclose(
      got, naive_cross_entropy(logits, labels, class_weights=cw,
                               pixel_weights=pw), rtol=1e-5)
  # Per-example weights drop a padded example entirely.
  ex = np.array([1.0, 0.0], np.float32)
  got = losses.cross_entropy(logits, labels, pixel_weights=ex)
  np.testing.assert_allclose(got, naive_cross_entropy(logits[:1], labels[:1]),
                             rtol=1e-5)


def test_cross_entropy_bfloat16_logits_and_custom_ignore():
  _, logits, labels = random_inputs(3, ignore_frac=0.0)
  got = losses.cross_entropy(jnp.asarray(logits, jnp.bfloat16), labels,
                             ignore_index=1)
  assert got.dtype == jnp.float32
  want = naive_cross_entropy(
      np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float32), labels,
      ignore_index=1)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_cross_entropy_all_ignored_is_zero_with_zero_grad():
  _, logits, _ = random_inputs(4)
  labels = np.full(logits.shape[:-1], 255, np.int32)
  value, grad = jax.jit(jax.value_and_grad(losses.cross_entropy))(
      jnp.asarray(logits), labels)
  assert float(value) == 0.0
  assert np.all(np.isfinite(grad)) and not np.any(grad)


def test_cross_entropy_gradient_numerically():
  _, logits, labels = random_inputs(5, n=1, h=2, w=3, k=3)
  cw = np.array([1.0, 2.0, 0.5], np.float32)
  f = lambda z: losses.cross_entropy(z, labels, class_weights=cw)
  jtu.check_grads(f, (jnp.asarray(logits, jnp.float32),), order=1,
                            modes=["rev"], atol=1e-2, rtol=1e-2)


# ----------------------------------------------------------------------------
# Focal loss.


def naive_focal(logits, labels, gamma=2.0, alpha=None, ignore_index=255,
                pixel_weights=None):
  """Lin et al.'s FL = -alpha_t (1 - p_t)^gamma log p_t, one pixel at a time;
  the pixel-weighted mean over counted pixels (alpha not in the denominator)."""
  logits = np.asarray(logits, np.float64)
  num = den = 0.0
  for idx in np.ndindex(labels.shape):
    y = int(labels[idx])
    if y == ignore_index:
      continue
    z = logits[idx]
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    a = 1.0 if alpha is None else (alpha[y] if np.ndim(alpha) else alpha)
    w = 1.0
    if pixel_weights is not None:
      pw = np.asarray(pixel_weights)
      w = pw[idx[0]] if pw.ndim == 1 else pw[idx]
    num += w * -a * (1 - p[y])**gamma * math.log(p[y])
    den += w
  return num / den if den > 0 else 0.0


@pytest.mark.parametrize("gamma,alpha", [
    (2.0, None), (2.0, (0.25, 0.5, 1.0, 2.0)), (0.5, 0.25), (1.0, None)])
def test_focal_matches_naive(gamma, alpha):
  rng, logits, labels = random_inputs(7)
  pw = rng.uniform(0.1, 3.0, size=labels.shape).astype(np.float32)
  alpha_arg = None if alpha is None else np.asarray(alpha, np.float32)
  got, weighted = jax.jit(lambda z: (
      losses.focal_loss(z, labels, gamma=gamma, alpha=alpha_arg),
      losses.focal_loss(z, labels, gamma=gamma, alpha=alpha_arg,
                        pixel_weights=pw)))(logits)
  assert got.dtype == jnp.float32 and got.shape == ()
  np.testing.assert_allclose(got, naive_focal(logits, labels, gamma, alpha),
                             rtol=1e-5)
  np.testing.assert_allclose(
      weighted, naive_focal(logits, labels, gamma, alpha, pixel_weights=pw),
      rtol=1e-5)


def test_focal_gamma_zero_is_cross_entropy_and_down_weights_easy_pixels():
  _, logits, labels = random_inputs(8)
  focal0, ce, focal2 = jax.jit(lambda z: (
      losses.focal_loss(z, labels, gamma=0.0), losses.cross_entropy(z, labels),
      losses.focal_loss(z, labels, gamma=2.0)))(logits)
  np.testing.assert_allclose(focal0, ce, rtol=1e-6)
  assert float(focal2) < float(ce)
  # A confident, correct pixel: p_t = 1 - 1e-9 still gives a finite, tiny
  # loss and gradient (1 - p_t computed with expm1), even for gamma < 1.
  z = jnp.array([[[[30.0, 9.3, 0.0]]]])
  for gamma in (2.0, 0.5):
    value, grad = jax.jit(jax.value_and_grad(losses.focal_loss),
                          static_argnums=2)(z, np.zeros((1, 1, 1), np.int32),
                                            gamma)
    assert 0 <= float(value) < 1e-8 and np.all(np.isfinite(grad))
  with pytest.raises(ConfigError, match="alpha"):
    losses.focal_loss(logits, labels, alpha=np.ones(3))


# ----------------------------------------------------------------------------
# Registry: the region losses, "sum", aux_weight.


def test_every_registered_loss_builds_from_a_config():
  from ml_collections import ConfigDict
  rng, logits, labels = random_inputs(9, h=16, w=16, k=3)
  batch = {"label": labels, "weight": np.ones(labels.shape, np.float32)}
  fns = {}
  for name in losses.available():
    kwargs = ({"terms": [("focal", 1.0), ("dice", 0.5)]} if name == "sum"
              else {"ignore_index": 255})
    fns[name] = losses.make_loss(ConfigDict({"name": name, "kwargs": kwargs}))
  cls = jnp.zeros((logits.shape[0], 2), jnp.float32)  # UNet 3+'s CGM output
  values = jax.jit(lambda o: {name: fn(o, batch) for name, fn in fns.items()})(
      {"logits": logits, "cls": cls})
  for name, value in values.items():
    assert np.isfinite(float(value)) and float(value) > 0, name


def test_unet3p_hybrid_and_sum_combinator():
  _, logits, labels = random_inputs(10, h=16, w=16, k=3)
  batch = {"label": labels}
  out = {"logits": logits}
  summed = losses.make_loss({"name": "sum", "kwargs": {"terms": [
      ("focal", 2.0, {"gamma": 2.0}),
      {"name": "dice", "weight": 0.5},
      ("iou",)]}})
  names = ("focal", "ms_ssim", "iou", "dice", "unet3p_hybrid")
  hybrid = losses.get_loss("unet3p_hybrid")
  ignored = {"label": np.full_like(labels, 255)}
  parts, summed_value, (value, grad) = jax.jit(lambda o: (
      {n: losses.get_loss(n)(o, batch) for n in names}, summed(o, batch),
      jax.value_and_grad(hybrid)(o, ignored)))(out)
  # All ignored: 0, with a zero (not NaN) gradient.
  assert float(value) == 0.0
  assert np.all(np.isfinite(grad["logits"])) and not np.any(grad["logits"])
  np.testing.assert_allclose(
      parts["unet3p_hybrid"],
      parts["focal"] + parts["ms_ssim"] + parts["iou"], rtol=1e-6)
  np.testing.assert_allclose(
      summed_value,
      2 * parts["focal"] + 0.5 * parts["dice"] + parts["iou"], rtol=1e-6)
  with pytest.raises(ConfigError, match="terms"):
    losses.get_loss("sum")
  with pytest.raises(ConfigError, match="gama"):
    losses.get_loss("sum", terms=[("focal", 1.0, {"gama": 2})])
  with pytest.raises(ConfigError, match="unknown loss"):
    losses.get_loss("sum", terms=[("focall", 1.0)])


def test_aux_weight_adds_the_mean_loss_over_aux_logits():
  rng, logits, labels = random_inputs(11)
  aux = [rng.normal(size=logits.shape).astype(np.float32) for _ in range(2)]
  batch = {"label": labels}
  for name in ("cross_entropy", "dice"):
    plain = losses.get_loss(name)
    with_aux = losses.get_loss(name, aux_weight=0.4)
    outputs = {"logits": logits, "aux": aux}
    got, main, aux0, aux1, ignoring_aux = jax.jit(lambda o: (
        with_aux(o, batch), plain(o["logits"], batch),
        plain(o["aux"][0], batch), plain(o["aux"][1], batch),
        plain(o, batch)))(outputs)
    np.testing.assert_allclose(got, main + 0.4 * (aux0 + aux1) / 2, rtol=1e-6)
    # Without aux_weight the aux logits are not used.
    np.testing.assert_allclose(ignoring_aux, main, rtol=1e-6)
  # Gradients reach the aux logits.
  grads = jax.jit(jax.grad(lambda o: losses.get_loss("focal", aux_weight=1.0)(
      o, batch)))({"logits": jnp.asarray(logits), "aux": [jnp.asarray(aux[0])]})
  assert np.any(grads["aux"][0]) and np.all(np.isfinite(grads["aux"][0]))
  # Also through make_loss's kwargs, and for "sum".
  fn = losses.make_loss({"name": "sum", "kwargs": {
      "terms": [("cross_entropy", 1.0)], "aux_weight": 0.5}})
  np.testing.assert_allclose(
      jax.jit(fn)({"logits": logits, "aux": aux[:1]}, batch),
      naive_cross_entropy(logits, labels)
      + 0.5 * naive_cross_entropy(aux[0], labels), rtol=1e-5)
  with pytest.raises(ConfigError, match="aux"):
    losses.get_loss("dice", aux_weight=0.4)({"logits": logits}, batch)
  with pytest.raises(ConfigError, match="aux_weight"):
    losses.get_loss("dice", aux_weight=-1.0)


# ----------------------------------------------------------------------------
# U-Net weight map.


def naive_weight_map(label, w0, sigma, background=0):
  """Brute-force distances to every object pixel; objects by flood fill."""
  h, w = label.shape
  seen = np.zeros_like(label, bool)
  objects = []
  for y0, x0 in np.ndindex(h, w):
    if label[y0, x0] == background or seen[y0, x0]:
      continue
    cls, stack, pixels = label[y0, x0], [(y0, x0)], []
    seen[y0, x0] = True
    while stack:
      y, x = stack.pop()
      pixels.append((y, x))
      for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
        if (0 <= ny < h and 0 <= nx < w and not seen[ny, nx]
            and label[ny, nx] == cls):
          seen[ny, nx] = True
          stack.append((ny, nx))
    objects.append(np.array(pixels))
  counts = {c: (label == c).sum() for c in np.unique(label)}
  out = np.zeros((h, w))
  for y, x in np.ndindex(h, w):
    wc = label.size / (len(counts) * counts[label[y, x]])
    border = 0.0
    if label[y, x] == background and len(objects) >= 2:
      d = sorted(np.sqrt(((o - (y, x))**2).sum(1)).min() for o in objects)
      border = w0 * math.exp(-(d[0] + d[1])**2 / (2 * sigma**2))
    out[y, x] = wc + border
  return out


def two_close_objects():
  """Two squares 2 pixels apart near the left edge; empty space to the right."""
  label = np.zeros((20, 40), np.int32)
  label[5:15, 2:8] = 1
  label[5:15, 10:16] = 1
  return label


def test_unet_weight_map_matches_brute_force():
  label = two_close_objects()
  label[1:3, 30:33] = 2  # a third object, of another class
  got = weight_map.unet_weight_map(label, w0=10.0, sigma=5.0)
  assert got.dtype == np.float32 and got.shape == label.shape
  np.testing.assert_allclose(got, naive_weight_map(label, 10.0, 5.0),
                             rtol=1e-5)


def test_unet_weight_map_high_between_objects_low_far_away():
  label = two_close_objects()
  weights = weight_map.unet_weight_map(label, w0=10.0, sigma=5.0)
  wc = weight_map.balanced_class_weights(label)
  background_wc = wc[0, 0]
  gap = weights[10, 8:10]  # the 2-pixel gap: d1 = 1, d2 = 2
  np.testing.assert_allclose(gap, background_wc + 10 * math.exp(-9 / 50),
                             rtol=1e-5)
  assert weights[10, 39] - background_wc < 1e-3  # far away: only w_c
  # Object pixels get their class weight only.
  np.testing.assert_allclose(weights[label == 1], wc[label == 1])
  # Balanced: each class carries the same total weight.
  np.testing.assert_allclose(wc[label == 0].sum(), wc[label == 1].sum())


def test_unet_weight_map_ignore_single_object_and_no_class_weights():
  label = np.zeros((12, 12), np.int32)
  label[3:6, 3:6] = 1
  label[0, :] = 255
  weights = weight_map.unet_weight_map(label, class_weights=None)
  # One object: no gap to emphasise; w_c = 1; ignored pixels weigh 0.
  np.testing.assert_array_equal(weights[0], 0.0)
  np.testing.assert_array_equal(weights[1:], 1.0)
  with pytest.raises(ConfigError):
    weight_map.unet_weight_map(label, class_weights="inverse")


# ----------------------------------------------------------------------------
# Registry.


def test_make_loss_cross_entropy_and_unet_weighted():
  rng, logits, labels = random_inputs(6)
  weight = rng.uniform(0.5, 2.0, size=labels.shape).astype(np.float32)
  ce = losses.make_loss({"name": "cross_entropy"})
  np.testing.assert_allclose(ce(logits, {"label": labels}),
                             naive_cross_entropy(logits, labels), rtol=1e-5)
  # The model's output dict works as well as its logits.
  np.testing.assert_allclose(ce({"logits": logits}, {"label": labels}),
                             naive_cross_entropy(logits, labels), rtol=1e-5)
  unet = losses.make_loss({"name": "unet_weighted",
                           "kwargs": {"class_weights": (1.0, 2.0, 1.0, 1.0)}})
  got = jax.jit(unet)(logits, {"label": labels, "weight": weight})
  want = naive_cross_entropy(logits, labels, class_weights=[1, 2, 1, 1],
                             pixel_weights=weight)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  with pytest.raises(DataError, match="weight"):
    unet(logits, {"label": labels})


def test_registry_errors_list_valid_choices():
  with pytest.raises(ConfigError, match="cross_entropy, dice, focal"):
    losses.get_loss("dice_typo")
  with pytest.raises(ConfigError, match="ignore_index"):
    losses.get_loss("cross_entropy", ignore_idx=0)
  with pytest.raises(ConfigError, match="name"):
    losses.make_loss({"kwargs": {}})


def _naive_hard_pixels(logits, labels, mode, thresh=0.7, min_kept=1, top_k=0.25):
  """mmsegmentation's OHEM sampler / bootstrapped CE, written out in numpy."""
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  keep = np.zeros(labels.shape, np.float32)
  idx = [tuple(i) for i in np.argwhere(labels != 255)]
  p = np.array([np.exp(logp[i][labels[i]]) for i in idx])
  if mode == "ohem":
    order = np.sort(p)
    threshold = max(order[min(min_kept * labels.shape[0], len(p) - 1)], thresh)
    for i, pi in zip(idx, p):
      keep[i] = float(pi < threshold)
  else:
    k = math.ceil(top_k * len(p))
    for j in np.argsort(-(-np.log(p)), kind="stable")[:k]:
      keep[idx[j]] = 1.0
  return keep


@pytest.mark.parametrize("mode,kw", [("ohem", dict(thresh=0.7, min_kept=5)),
                                     ("ohem", dict(thresh=0.05, min_kept=40)),
                                     ("top_k", dict(top_k=0.25)),
                                     ("top_k", dict(top_k=1.0))])
def test_hard_pixel_weights_match_naive(mode, kw):
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 6, 7, 4)).astype(np.float32) * 2
  labels = rng.integers(0, 4, (2, 6, 7)).astype(np.int32)
  labels[0, :2] = 255
  got = jax.jit(lambda l, y: losses.hard_pixel_weights(l, y, mode, **kw))(logits, labels)
  np.testing.assert_array_equal(got, _naive_hard_pixels(logits, labels, mode, **kw))


def test_ohem_cross_entropy_is_ce_over_the_hard_pixels():
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.normal(size=(2, 8, 8, 3)).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, 3, (2, 8, 8)).astype(np.int32))
  batch = {"label": labels}
  loss_fn = losses.make_loss({"name": "ohem_cross_entropy",
                              "kwargs": {"thresh": 0.5, "min_kept": 4}})
  hard = losses.hard_pixel_weights(logits, labels, "ohem", 0.5, 4)
  assert 0 < float(hard.sum()) < hard.size  # some, not all, pixels are hard
  want = losses.cross_entropy(logits, labels, pixel_weights=hard)
  np.testing.assert_allclose(loss_fn({"logits": logits}, batch), want, rtol=1e-6)
  # The hard pixels have higher loss than the average pixel.
  assert float(want) > float(losses.cross_entropy(logits, labels))
  grads = jax.grad(lambda l: loss_fn({"logits": l}, batch))(logits)
  assert np.isfinite(grads).all()
  # Easy pixels get no gradient.
  assert np.abs(np.asarray(grads)[np.asarray(hard) == 0]).max() == 0
  with pytest.raises(ConfigError, match="top_k"):
    losses.hard_pixel_weights(logits, labels, "top_k", top_k=0.0)


def test_cgm_loss_targets_whether_an_image_has_objects():
  labels = np.zeros((3, 4, 4), np.int32)
  labels[1, 2, 2] = 2          # an object
  labels[2] = 255              # all ignored: no object
  labels[2, 0, 0] = 0
  cls = np.array([[2.0, -1.0], [0.5, 0.3], [-3.0, 1.0]], np.float32)
  got = losses.get_loss("cgm")({"logits": None, "cls": jnp.asarray(cls)}, {"label": labels})
  target = np.array([[1, 0], [0, 1], [1, 0]], np.float32)
  p = 1 / (1 + np.exp(-cls))
  want = -np.mean(target * np.log(p) + (1 - target) * np.log(1 - p))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  with pytest.raises(ConfigError, match="cgm=True"):
    losses.get_loss("cgm")({"logits": jnp.zeros((1, 2, 2, 2))}, {"label": labels[:1]})
