"""U-Net specifics: valid padding and overlap-tile, upsampling layers, learning.

The generic contract (shapes, gradients, batch_stats) is in test_contract.py.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import models
from segjax.errors import ConfigError

from learning import train_losses  # pylint: disable=import-error
from segjax.models import layers
from segjax.models.unet import valid_unet_sizes


def make_key(seed):
  # rbg compiles much faster than threefry on XLA:CPU; the stream is irrelevant.
  return jax.random.key(seed, impl="rbg")


def init(model, shape):
  return jax.jit(lambda x: model.init(make_key(0), x))(jnp.zeros(shape))


# ----------------------------------------------------------------------------
# valid_unet_sizes and the valid (unpadded) network.


def simulate_valid(input_size, depth):
  """Output size of a valid U-Net, or None if a pooling sees an odd size."""
  x = input_size
  for _ in range(depth):
    x -= 4
    if x < 2 or x % 2:
      return None
    x //= 2
  x -= 4
  if x < 1:
    return None
  for _ in range(depth):
    x = 2 * x - 4
  return x


def test_valid_unet_sizes_paper_example():
  assert valid_unet_sizes(388, depth=4) == (572, 92)
  assert simulate_valid(572, 4) == 388


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_valid_unet_sizes_is_smallest_covering_input(depth):
  for out in range(1, 200, 7):
    size, margin = valid_unet_sizes(out, depth)
    got = simulate_valid(size, depth)
    assert got is not None and got >= out
    assert size - got == 2 * margin
    # No smaller valid input covers `out` pixels.
    for smaller in range(1, size):
      got = simulate_valid(smaller, depth)
      assert got is None or got < out


def test_valid_unet_output_shape_and_alignment():
  model = models.build("unet", 2, base_width=4, depth=2, padding="valid")
  variables = init(model, (1, 16, 16, 3))
  apply = jax.jit(lambda x: model.apply(variables, x)["logits"])
  # Smaller than the margin (20): mirror padding reflects repeatedly.
  assert apply(jnp.ones((2, 10, 7, 3))).shape == (2, 10, 7, 2)

  # Alignment: poke image row p and see which logit rows change. Pooling
  # makes the receptive field depend on p mod 2**depth, but over all phases
  # it spans margin + 2**depth - 1 rows on *both* sides of p: the output is
  # centred on the image, as in the paper's overlap-tile figure. An output
  # shifted by even one row would make the span lopsided.
  _, margin = valid_unet_sizes(96, 2)
  image = np.random.default_rng(0).normal(size=(1, 96, 4, 3)).astype(np.float32)
  base = apply(image)
  before, after = [], []
  for p in range(40, 44):
    poked = image.copy()
    poked[0, p, 1] += 10.0
    rows = np.nonzero(np.any(np.abs(apply(poked) - base) > 1e-6,
                             axis=(0, 2, 3)))[0]
    assert rows.min() <= p <= rows.max()
    before.append(p - rows.min())
    after.append(rows.max() - p)
  assert max(before) == max(after) == margin + 2**2 - 1


def test_unet_rejects_bad_options():
  with pytest.raises(ConfigError, match="padding"):
    models.build("unet", 2, padding="reflect")
  with pytest.raises(ConfigError, match="upsample"):
    models.build("unet", 2, upsample="nearest")
  with pytest.raises(ConfigError, match="dtype"):
    models.build("unet", 2, dtype="float33")


# ----------------------------------------------------------------------------
# Upsampling layers.


def test_depth_to_space_order():
  x = np.arange(2 * 3 * 4 * 8, dtype=np.float32).reshape(2, 3, 4, 8)
  y = np.asarray(layers.depth_to_space(jnp.asarray(x), 2))
  assert y.shape == (2, 6, 8, 2)
  for n, i, j, a, b, c in np.ndindex(2, 3, 4, 2, 2, 2):
    assert y[n, 2 * i + a, 2 * j + b, c] == x[n, i, j, (a * 2 + b) * 2 + c]


def test_fast_transposed_conv_equals_nn_conv_transpose():
  x = jax.random.normal(jax.random.key(0), (2, 5, 7, 6))
  reference = nn.ConvTranspose(4, (2, 2), strides=(2, 2))
  variables = reference.init(make_key(1), x)
  variables = jax.tree_util.tree_map(  # a non-zero bias, to test it too
      lambda v: v + 0.1, variables)
  want = reference.apply(variables, x)
  assert want.shape == (2, 10, 14, 4)
  for impl in ("fast", "xla"):
    fast = layers.ConvTranspose2x(4, impl=impl)
    got = jax.jit(fast.apply)(variables, x)  # the same params, unchanged
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=impl)
  # bfloat16 compute: params float32, output in bfloat16.
  out = layers.ConvTranspose2x(4, dtype=jnp.bfloat16).apply(variables, x)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(np.float32), want, atol=0.1)


def naive_bilinear_up2x(x):
  """PyTorch's bilinear, align_corners=False, scale 2, one pixel at a time."""
  n, h, w, c = x.shape
  out = np.zeros((n, 2 * h, 2 * w, c))

  def source(dst, size):
    s = max((dst + 0.5) / 2 - 0.5, 0.0)
    lo = min(int(np.floor(s)), size - 1)
    hi = min(lo + 1, size - 1)
    return lo, hi, s - lo

  for i in range(2 * h):
    y0, y1, fy = source(i, h)
    for j in range(2 * w):
      x0, x1, fx = source(j, w)
      out[:, i, j] = ((1 - fy) * ((1 - fx) * x[:, y0, x0] + fx * x[:, y0, x1])
                      + fy * ((1 - fx) * x[:, y1, x0] + fx * x[:, y1, x1]))
  return out


def test_bilinear_up2x_matches_pytorch_semantics():
  x = np.random.default_rng(0).normal(size=(2, 4, 5, 3)).astype(np.float32)
  module = layers.BilinearUp2x(3)
  variables = {"params": {"conv": {"kernel": jnp.eye(3)[None, None],
                                   "bias": jnp.zeros(3)}}}
  got = jax.jit(module.apply)(variables, x)
  np.testing.assert_allclose(got, naive_bilinear_up2x(x), atol=1e-5)


@pytest.mark.parametrize("upsample", ["transpose", "bilinear"])
def test_upsample_variants_and_bfloat16(upsample):
  model = models.build("unet", 3, base_width=4, depth=2, upsample=upsample,
                       norm="none", dropout=0.5)
  variables = init(model, (1, 16, 16, 3))
  x = jax.random.normal(jax.random.key(2), (2, 21, 18, 3))
  logits = jax.jit(lambda v, x: model.apply(v, x)["logits"])(variables, x)
  assert logits.shape == (2, 21, 18, 3) and logits.dtype == jnp.float32
  # The same params drive a bfloat16 model, which still returns float32.
  model16 = models.build("unet", 3, base_width=4, depth=2, upsample=upsample,
                         norm="none", dtype="bfloat16")
  logits16 = jax.jit(lambda v, x: model16.apply(v, x)["logits"])(variables, x)
  assert logits16.dtype == jnp.float32
  np.testing.assert_allclose(logits16, logits, atol=0.1 * np.abs(logits).max())
  # Dropout is active in training only, and needs its rng there.
  train = jax.jit(lambda v, x, k: model.apply(
      v, x, train=True, rngs={"dropout": k})["logits"])
  a, b = train(variables, x, make_key(3)), train(variables, x, make_key(4))
  assert not np.allclose(a, b)


def test_bn_axis_name_reaches_batchnorm():
  model = models.build("unet", 2, base_width=4, depth=1, bn_axis_name="batch")
  variables = init(model, (2, 8, 8, 3))
  x = jnp.ones((2, 8, 8, 3))
  # Outside pmap the axis is unbound, so BatchNorm must be asking for it.
  with pytest.raises(NameError, match="batch"):
    jax.eval_shape(lambda: model.apply(variables, x, train=True,
                                       mutable=["batch_stats"]))
  out, _ = jax.pmap(
      lambda x: model.apply(variables, x, train=True, mutable=["batch_stats"]),
      axis_name="batch")(x.reshape(2, 1, 8, 8, 3))
  assert out["logits"].shape == (2, 1, 8, 8, 2)


# ----------------------------------------------------------------------------
# It learns.


def squares_batch(n=4, size=32, seed=0):
  """Noisy images with one bright square each; label 1 inside the square."""
  rng = np.random.default_rng(seed)
  images = rng.normal(scale=0.3, size=(n, size, size, 3)).astype(np.float32)
  labels = np.zeros((n, size, size), np.int32)
  for i in range(n):
    side = rng.integers(8, 16)
    y, x = rng.integers(0, size - side, size=2)
    labels[i, y:y + side, x:x + side] = 1
    images[i, y:y + side, x:x + side] += 1.0
  return images, labels


def test_unet_learns_squares():
  images, labels = squares_batch()
  model = models.build("unet", 2, base_width=8, depth=2)
  variables = init(model, images.shape)
  history = train_losses(model, images, labels, 100, 1e-2, variables)
  assert history[-1] <= 0.1 * history[0], history[::10]
