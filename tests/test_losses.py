"""Tests for segjax.losses against numpy references."""
import math

import jax
from jax import test_util as jtu
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import losses
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
  got = losses.unet_weight_map(label, w0=10.0, sigma=5.0)
  assert got.dtype == np.float32 and got.shape == label.shape
  np.testing.assert_allclose(got, naive_weight_map(label, 10.0, 5.0),
                             rtol=1e-5)


def test_unet_weight_map_high_between_objects_low_far_away():
  label = two_close_objects()
  weights = losses.unet_weight_map(label, w0=10.0, sigma=5.0)
  wc = losses.balanced_class_weights(label)
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
  weights = losses.unet_weight_map(label, class_weights=None)
  # One object: no gap to emphasise; w_c = 1; ignored pixels weigh 0.
  np.testing.assert_array_equal(weights[0], 0.0)
  np.testing.assert_array_equal(weights[1:], 1.0)
  with pytest.raises(ConfigError):
    losses.unet_weight_map(label, class_weights="inverse")


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
  with pytest.raises(ConfigError, match="cross_entropy, unet_weighted"):
    losses.get_loss("dice_typo")
  with pytest.raises(ConfigError, match="ignore_index"):
    losses.get_loss("cross_entropy", ignore_idx=0)
  with pytest.raises(ConfigError, match="name"):
    losses.make_loss({"kwargs": {}})
