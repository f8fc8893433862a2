"""Tests for segjax.region_losses (Dice, IoU, Lovász, MS-SSIM) and their
registry entries, against naive numpy references written from the papers."""
import jax
from jax import test_util as jtu
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import needs
from segjax import losses, region_losses
from segjax.errors import ConfigError


def random_inputs(seed, n=2, h=5, w=6, k=4, ignore_frac=0.25, scale=3.0):
  rng = np.random.default_rng(seed)
  logits = (rng.normal(size=(n, h, w, k)) * scale).astype(np.float32)
  labels = rng.integers(0, k, size=(n, h, w)).astype(np.int32)
  labels[rng.random((n, h, w)) < ignore_frac] = 255
  return rng, logits, labels


def np_softmax(logits):
  z = np.asarray(logits, np.float64)
  z = np.exp(z - z.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------
# Dice and IoU.


def naive_region(logits, labels, kind, smooth=0.0, eps=1e-7, skip_absent=True,
                 squared=False, binary=False, pixel_weights=None):
  """Per-class sums with explicit loops over classes and pixels, float64."""
  if binary:
    probs = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
    labels = np.where(labels == 255, 255, labels)
  else:
    probs = np_softmax(logits)
  k = probs.shape[-1]
  pw = np.ones(labels.shape) if pixel_weights is None else np.broadcast_to(
      np.asarray(pixel_weights).reshape(
          (-1,) + (1,) * (labels.ndim - 1) if np.ndim(pixel_weights) == 1
          else labels.shape), labels.shape)
  per_class, present = [], []
  for c in range(k):
    inter = sp = sg = 0.0
    for idx in np.ndindex(labels.shape):
      y = labels[idx]
      if y == 255:
        continue
      p = probs[idx][c]
      g = float(y == (1 if binary else c))
      w = pw[idx]
      inter += w * p * g
      sp += w * (p * p if squared else p)
      sg += w * (g * g if squared else g)
    present.append(sg > 0)
    if kind == "dice":
      score = (2 * inter + smooth) / max(sp + sg + smooth, eps)
    else:
      score = (inter + smooth) / max(sp + sg - inter + smooth, eps)
    per_class.append(1.0 - score)
  per_class, present = np.array(per_class), np.array(present)
  if skip_absent:
    return per_class[present].mean() if present.any() else 0.0
  return per_class.mean()


@pytest.mark.parametrize("kind", ["dice", "iou"])
@pytest.mark.parametrize("options", [
    {}, {"skip_absent": False}, {"smooth": 1.0, "squared": True}])
def test_dice_iou_match_naive(kind, options):
  if kind == "iou" and "squared" in options:
    options = {"smooth": 1.0}
  _, logits, labels = random_inputs(0, k=5)
  labels[labels == 4] = 0  # class 4 absent
  fn = region_losses.dice_loss if kind == "dice" else region_losses.iou_loss
  got = jax.jit(lambda z: fn(z, labels, **options))(logits)
  assert got.dtype == jnp.float32 and got.shape == ()
  np.testing.assert_allclose(got, naive_region(logits, labels, kind, **options),
                             rtol=1e-5)


def test_iou_is_unet3p_formula_and_dice_binary_mode():
  # UNet 3+ IoU for one image, one foreground map: 1 - sum(pg) / sum(p+g-pg).
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(1, 4, 4, 1)).astype(np.float32)
  labels = rng.integers(0, 2, size=(1, 4, 4)).astype(np.int32)
  p = 1 / (1 + np.exp(-logits[..., 0].astype(np.float64)))
  g = labels.astype(np.float64)
  want = 1 - (p * g).sum() / (p + g - p * g).sum()
  labels_ignored = labels.copy()
  labels_ignored[0, 0] = 255
  iou, dice = jax.jit(lambda z: (
      region_losses.iou_loss(z, labels, mode="binary"),
      region_losses.dice_loss(z, labels_ignored, mode="binary")))(logits)
  np.testing.assert_allclose(iou, want, rtol=1e-5)
  np.testing.assert_allclose(
      dice, naive_region(logits, labels_ignored, "dice", binary=True),
      rtol=1e-5)
  with pytest.raises(ConfigError, match="binary"):
    region_losses.dice_loss(np.zeros((1, 4, 4, 2)), labels, mode="binary")


def test_dice_iou_perfect_prediction_and_example_weights():
  _, logits, labels = random_inputs(2, ignore_frac=0.2)
  perfect = 40.0 * np.eye(4, dtype=np.float32)[np.where(labels == 255, 0,
                                                        labels)]
  pw = np.random.default_rng(3).uniform(0.5, 2, labels.shape)
  for fn in (region_losses.dice_loss, region_losses.iou_loss):
    kind = "dice" if fn is region_losses.dice_loss else "iou"
    # Weight 0 drops the second example (a padded one) entirely.
    perfect_loss, dropped, first, weighted = jax.jit(lambda z, y: (
        fn(perfect, y), fn(z, y, pixel_weights=np.array([1.0, 0.0])),
        fn(z[:1], y[:1]), fn(z, y, pixel_weights=pw)))(logits, labels)
    assert float(perfect_loss) < 1e-6
    np.testing.assert_allclose(dropped, first, rtol=1e-6)
    np.testing.assert_allclose(
        weighted, naive_region(logits, labels, kind, pixel_weights=pw),
        rtol=1e-5)


# ----------------------------------------------------------------------------
# Lovász-Softmax.


def naive_lovasz_grad(gt_sorted):
  """Berman et al.'s lovasz_grad, numpy."""
  gt_sorted = np.asarray(gt_sorted, np.float64)
  gts = gt_sorted.sum()
  intersection = gts - np.cumsum(gt_sorted)
  union = gts + np.cumsum(1.0 - gt_sorted)
  jaccard = 1.0 - intersection / union
  jaccard[1:] = jaccard[1:] - jaccard[:-1]
  return jaccard


def naive_lovasz_flat(probs, labels, classes):
  """The reference lovasz_softmax_flat on the counted pixels only."""
  if len(labels) == 0:
    return None
  k = probs.shape[1]
  ids = range(k) if classes in ("present", "all") else classes
  out = []
  for c in ids:
    fg = (labels == c).astype(np.float64)
    if classes == "present" and fg.sum() == 0:
      continue
    errors = np.abs(fg - probs[:, c])
    perm = np.argsort(-errors, kind="stable")
    out.append(np.dot(errors[perm], naive_lovasz_grad(fg[perm])))
  return np.mean(out) if out else 0.0


def naive_lovasz(logits, labels, per_image=False, classes="present"):
  probs = np_softmax(logits)
  k = probs.shape[-1]
  groups = range(len(labels)) if per_image else [slice(None)]
  values = []
  for gi in groups:
    p, y = probs[gi].reshape(-1, k), labels[gi].reshape(-1)
    value = naive_lovasz_flat(p[y != 255], y[y != 255], classes)
    if value is not None:  # images without a counted pixel are skipped
      values.append(value)
  return np.mean(values) if values else 0.0


def test_lovasz_grad_by_hand():
  # Sorted errors belong to pixels with ground truth [1, 0, 1]; gts = 2.
  #   I = 2 - cumsum(g)     = [1, 1, 0]
  #   U = 2 + cumsum(1 - g) = [2, 3, 3]
  #   J = 1 - I / U         = [1/2, 2/3, 1]
  #   grad = J increments   = [1/2, 1/6, 1/3]
  grad = jax.jit(region_losses.lovasz_grad)
  np.testing.assert_allclose(grad(np.array([1., 0., 1.])),
                             [1 / 2, 1 / 6, 1 / 3], rtol=1e-6)
  # No foreground: J = [1, 1, 1] -> the largest error alone is the loss.
  np.testing.assert_allclose(grad(np.zeros(3)), [1, 0, 0])
  np.testing.assert_allclose(naive_lovasz_grad([1., 0., 1.]),
                             [1 / 2, 1 / 6, 1 / 3])
  # Not-counted pixels (last in the order) get 0 and change nothing else.
  np.testing.assert_allclose(
      grad(np.array([1., 0., 1., 1., 0.]), np.array([1., 1., 1., 0., 0.])),
      [1 / 2, 1 / 6, 1 / 3, 0, 0], rtol=1e-6)


def test_lovasz_softmax_three_pixels_by_hand():
  # Three pixels, two classes, labels [1, 0, 1], P(class 1) = [.9, .4, .3].
  # Class 1: errors |g - p| = [.1, .4, .7]; sorted [.7, .4, .1] with ground
  #   truth [1, 0, 1]: grad [1/2, 1/6, 1/3] (above), loss .35 + .4/6 + .1/3
  #   = .45.
  # Class 0: P = [.1, .6, .7], g = [0, 1, 0], errors [.1, .4, .7]; sorted
  #   [.7, .4, .1] with ground truth [0, 1, 0]: gts = 1, I = [1, 0, 0],
  #   U = [2, 2, 3], J = [1/2, 1, 1], grad [1/2, 1/2, 0], loss .35 + .2 = .55.
  # Mean over the two present classes: 0.5.
  p1 = np.array([0.9, 0.4, 0.3])
  logits = np.log(np.stack([1 - p1, p1], -1)).reshape(1, 1, 3, 2)
  labels = np.array([[[1, 0, 1]]], np.int32)
  # An ignored fourth pixel, however wrong, changes nothing.
  logits4 = np.concatenate([logits, np.log([[[[0.01, 0.99]]]])], axis=2)
  labels4 = np.array([[[1, 0, 1, 255]]], np.int32)
  three, four = jax.jit(lambda: (
      region_losses.lovasz_softmax(logits.astype(np.float32), labels),
      region_losses.lovasz_softmax(logits4.astype(np.float32), labels4)))()
  np.testing.assert_allclose(three, 0.5, rtol=1e-5)
  np.testing.assert_allclose(four, 0.5, rtol=1e-5)


def test_lovasz_is_jaccard_loss_at_hard_predictions():
  _, logits, labels = random_inputs(4, k=3, ignore_frac=0.1)
  pred = logits.argmax(-1)
  hard = 50.0 * np.eye(3, dtype=np.float32)[pred]  # softmax ~ one-hot
  ious = []
  valid = labels != 255
  for c in range(3):
    g, p = (labels == c) & valid, (pred == c) & valid
    if g.any():
      ious.append((g & p).sum() / (g | p).sum())
  perfect = 50.0 * np.eye(3, dtype=np.float32)[np.where(valid, labels, 0)]
  at_hard, at_perfect = jax.jit(jax.vmap(region_losses.lovasz_softmax,
                                         in_axes=(0, None)))(
                                             np.stack([hard, perfect]), labels)
  np.testing.assert_allclose(at_hard, 1 - np.mean(ious), rtol=1e-5)
  assert float(at_perfect) < 1e-6


@pytest.mark.parametrize("per_image,classes", [
    (False, "present"), (True, "present"), (False, "all"), (True, [0, 2])])
def test_lovasz_matches_naive(per_image, classes):
  _, logits, labels = random_inputs(5, n=3, k=4)
  labels[1] = 255          # an all-ignored example (batch padding)
  labels[2][labels[2] == 3] = 0
  fn = jax.jit(lambda z: region_losses.lovasz_softmax(
      z, labels, per_image=per_image, classes=classes))
  np.testing.assert_allclose(
      fn(logits), naive_lovasz(logits, labels, per_image, classes), rtol=1e-5)


# ----------------------------------------------------------------------------
# MS-SSIM.


def np_gaussian_filter(img, size, sigma):
  """'valid' 2-D Gaussian filtering of one [H, W] image, float64."""
  x = np.arange(size) - size // 2
  g = np.exp(-x**2 / (2 * sigma**2))
  g /= g.sum()
  windows = np.lib.stride_tricks.sliding_window_view(img, (size, size))
  return np.einsum("ijab,a,b->ij", windows, g, g)


def np_ms_ssim(x, y, data_range=1.0, win=11, sigma=1.5, k1=0.01, k2=0.03,
               weights=region_losses.MS_SSIM_WEIGHTS, eps=1e-6):
  """Wang et al. 2003 for one pair of [H, W] images, l, c, s kept apart."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  c1, c2 = (k1 * data_range)**2, (k2 * data_range)**2
  c3 = c2 / 2
  value = 1.0
  for j, wj in enumerate(weights):
    size = min(win, *x.shape)
    f = lambda z: np_gaussian_filter(z, size, sigma)
    mx, my = f(x), f(y)
    vx = np.maximum(f(x * x) - mx**2, 0)
    vy = np.maximum(f(y * y) - my**2, 0)
    cov = f(x * y) - mx * my
    sx, sy = np.sqrt(vx), np.sqrt(vy)
    lum = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
    con = (2 * sx * sy + c2) / (vx + vy + c2)
    st = (cov + c3) / (sx * sy + c3)
    if j == len(weights) - 1:
      factor = np.mean(lum * con * st)
    else:
      factor = np.mean(con * st)
      h, w = x.shape[0] // 2 * 2, x.shape[1] // 2 * 2
      pool = lambda z: z[:h, :w].reshape(h // 2, 2, w // 2, 2).mean((1, 3))
      x, y = pool(x), pool(y)
    value *= max(factor, eps)**wj
  return value


def image_pair(seed=0, size=64, noise=0.3):
  """A smooth-ish image and a noisy copy, in [0, 1]."""
  rng = np.random.default_rng(seed)
  x = rng.random((size, size))
  x = np.cumsum(np.cumsum(x, 0), 1)
  x = (x - x.min()) / (x.max() - x.min())
  y = np.clip(x + noise * rng.normal(size=x.shape), 0, 1)
  return x.astype(np.float32), y.astype(np.float32)


# np_ms_ssim(*image_pair()): a regression value for the float64 reference.
KNOWN_MS_SSIM = 0.4419429487276174
# No README figure. Measured (float32 MS-SSIM, relative): 3.1e-7 against the
# float64 reference, 1.1e-6 against TensorFlow's ssim_multiscale, 2.8e-6
# against pytorch_msssim.
MS_SSIM_RTOL = 1e-5


def test_ms_ssim_matches_reference_known_value_identity_symmetry():
  x, y = image_pair()
  rng = np.random.default_rng(1)
  u, v = rng.random((2, 64, 64)).astype(np.float32)  # independent noise
  xs = np.stack([np.stack([x, u], -1), np.stack([y, x], -1)])   # [2,64,64,2]
  ys = np.stack([np.stack([y, v], -1), np.stack([x, x], -1)])
  got, wider = jax.jit(lambda a, b: (
      region_losses.ms_ssim(a, b), region_losses.ms_ssim(a, b, data_range=2.0))
                       )(xs, ys)
  assert got.shape == (2, 2) and got.dtype == jnp.float32
  want = [[np_ms_ssim(x, y), np_ms_ssim(u, v)], [np_ms_ssim(y, x), 1.0]]
  np.testing.assert_allclose(got, want, rtol=MS_SSIM_RTOL, atol=1e-6)
  # The known value (from np_ms_ssim on this fixed pair; float64).
  np.testing.assert_allclose(np_ms_ssim(x, y), KNOWN_MS_SSIM, rtol=1e-6)
  np.testing.assert_allclose(got[0, 0], KNOWN_MS_SSIM, rtol=MS_SSIM_RTOL)
  np.testing.assert_allclose(got[0, 0], got[1, 0], rtol=1e-6)  # symmetric
  np.testing.assert_allclose(got[1, 1], 1.0, rtol=1e-6)        # (x, x)
  # A data range twice as wide makes the same pair look more similar.
  assert float(wider[0, 0]) > float(got[0, 0])


@pytest.mark.slow  # importing TensorFlow takes longer than the test
def test_ms_ssim_matches_tensorflow():
  tf = needs("tensorflow")
  # 176 = 11 * 2^4: TF needs the full window at every scale.
  x, y = image_pair(seed=2, size=176, noise=0.2)
  want = tf.image.ssim_multiscale(x[None, ..., None], y[None, ..., None],
                                  max_val=1.0).numpy()
  got = jax.jit(region_losses.ms_ssim)(x[None, ..., None], y[None, ..., None])
  np.testing.assert_allclose(got[0, 0], want[0], rtol=MS_SSIM_RTOL)


def test_ms_ssim_matches_pytorch_msssim():
  torch = needs("torch")
  pytorch_msssim = needs("pytorch_msssim")
  x, y = image_pair(seed=2, size=176, noise=0.2)
  want = pytorch_msssim.ms_ssim(torch.from_numpy(x)[None, None],
                                torch.from_numpy(y)[None, None],
                                data_range=1.0).item()
  got = jax.jit(region_losses.ms_ssim)(x[None, ..., None], y[None, ..., None])
  np.testing.assert_allclose(got[0, 0], want, rtol=MS_SSIM_RTOL)


def test_ms_ssim_loss_matches_reference():
  _, logits, labels = random_inputs(6, n=2, h=16, w=20, k=3, scale=1.5)
  labels[1, :4] = 255
  got = jax.jit(region_losses.ms_ssim_loss)(logits, labels)
  probs = np_softmax(logits)
  want = []
  for i in range(2):
    valid = labels[i] != 255
    scores = [np_ms_ssim(probs[i, ..., c] * valid,
                         (labels[i] == c) * valid) for c in range(3)]
    want.append(1 - np.mean(scores))
  np.testing.assert_allclose(got, np.mean(want), rtol=MS_SSIM_RTOL)
  with pytest.raises(ValueError, match="16"):
    region_losses.ms_ssim_loss(logits[:, :8], labels[:, :8])


# ----------------------------------------------------------------------------
# Properties every registered loss has.

# The losses this module adds (cross-entropy has its own tests). The UNet 3+
# hybrid is the sum of three of them (tests/test_losses.py checks that).
NEW_LOSSES = ["focal", "dice", "iou", "lovasz_softmax", "ms_ssim"]


def batch_for(seed, n=2, h=16, w=16, k=3):
  rng, logits, labels = random_inputs(seed, n=n, h=h, w=w, k=k, scale=2.0)
  weight = rng.uniform(0.5, 2.0, size=labels.shape).astype(np.float32)
  return logits, {"label": labels, "weight": weight}


_VALUE_AND_GRAD = {}


def value_and_grad_of(name):
  """One compiled value-and-gradient per loss, shared by the tests below."""
  if name not in _VALUE_AND_GRAD:
    _VALUE_AND_GRAD[name] = jax.jit(jax.value_and_grad(losses.get_loss(name)))
  return _VALUE_AND_GRAD[name]


@pytest.mark.parametrize("name", NEW_LOSSES)
def test_registered_loss_jit_finite_and_all_ignored_zero(name):
  logits, batch = batch_for(0)
  value, grad = value_and_grad_of(name)(jnp.asarray(logits), batch)
  assert value.dtype == jnp.float32 and value.shape == ()
  assert np.isfinite(float(value)) and float(value) > 0
  assert np.all(np.isfinite(grad)) and np.any(grad)
  ignored = dict(batch, label=np.full_like(batch["label"], 255))
  value, grad = value_and_grad_of(name)(jnp.asarray(logits), ignored)
  assert float(value) == 0.0
  assert np.all(np.isfinite(grad)) and not np.any(grad)


@pytest.mark.parametrize("name", NEW_LOSSES)
def test_registered_loss_bfloat16_logits_computed_in_float32(name):
  logits, batch = batch_for(1)
  low = jnp.asarray(logits, jnp.bfloat16)
  fn = losses.get_loss(name)
  got, want = jax.jit(lambda z: (fn(z, batch), fn(z.astype(jnp.float32),
                                                   batch)))(low)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("name", NEW_LOSSES)
def test_registered_loss_gradient_numerically(name):
  # MS-SSIM's five scales need 16 pixels a side; the others run smaller.
  big = name == "ms_ssim"
  logits, batch = batch_for(2, n=1, h=16 if big else 3, w=16 if big else 4)
  fn = jax.jit(lambda z: losses.get_loss(name)(z, batch))
  jtu.check_grads(fn, (jnp.asarray(logits),), order=1, modes=["rev"],
                  atol=1e-2, rtol=1e-2)
