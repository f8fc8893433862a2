"""UNet++ specifics: nested nodes, deep supervision, pruning, learning.

The generic contract (shapes, gradients, batch_stats) is in test_contract.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from segjax import losses
from segjax import models
from segjax.errors import ConfigError

from learning import squares_batch, train_losses  # pylint: disable=import-error


def make_key(seed):
  # rbg compiles much faster than threefry on XLA:CPU; the stream is irrelevant.
  return jax.random.key(seed, impl="rbg")


def param_shapes(model, shape):
  """{path tuple: shape} of the params, from shapes only (nothing runs)."""
  variables = jax.eval_shape(lambda: model.init(make_key(0), jnp.zeros(shape)))
  return {k: v.shape
          for k, v in traverse_util.flatten_dict(variables["params"]).items()}


def nodes_of(shapes):
  return {k[0] for k in shapes if k[0].startswith("X_")}


@pytest.mark.parametrize("depth", [2, 4])
def test_nested_nodes_and_channels(depth):
  """X^{i,j} exists exactly for i + j <= L and sees j + 1 inputs of width f_i.

  f_i = base_width * 2**i; X^{i,j} (j >= 1) concatenates X^{i,0..j-1} and
  Up(X^{i+1,j-1}) (upsampled to f_i channels): (j + 1) * f_i channels.
  """
  model = models.build("unet_pp", 3, depth=depth, base_width=4)
  shapes = param_shapes(model, (1, 16, 16, 3))
  width = lambda i: 4 * 2**i
  want = {f"X_{i}_{j}" for i in range(depth + 1) for j in range(depth + 1 - i)}
  assert nodes_of(shapes) == want
  assert len(want) == (depth + 1) * (depth + 2) // 2
  for i in range(depth + 1):
    for j in range(depth + 1 - i):
      c_in = (3 if i == 0 else width(i - 1)) if j == 0 else (j + 1) * width(i)
      assert shapes[f"X_{i}_{j}", "conv0", "conv", "kernel"] == (
          3, 3, c_in, width(i)), (i, j)
      assert shapes[f"X_{i}_{j}", "conv1", "conv", "kernel"] == (
          3, 3, width(i), width(i))
      if j:  # the paper's 2x2 up-convolution, from f_{i+1} to f_i channels
        assert shapes[f"up_{i}_{j}", "kernel"] == (2, 2, width(i + 1), width(i))
  # Deep supervision: one 1x1 head on each of X^{0,1..L}.
  heads = {k[0] for k in shapes if k[0].startswith("head_")}
  assert heads == {f"head_{j}" for j in range(1, depth + 1)}
  assert shapes["head_1", "kernel"] == (1, 1, width(0), 3)


def test_paper_defaults_and_options():
  model = models.build("unet_pp", 2)
  shapes = param_shapes(model, (1, 16, 16, 3))
  # Filters 32, 64, 128, 256, 512 (L = 4).
  assert [shapes[f"X_{i}_0", "conv1", "conv", "kernel"][-1]
          for i in range(5)] == [32, 64, 128, 256, 512]
  assert model.deep_supervision and model.prune_level is None
  # Bilinear upsampling: a 1x1 conv (before the resize) instead.
  bilinear = models.build("unet_pp", 2, depth=2, base_width=4,
                          upsample="bilinear")
  shapes = param_shapes(bilinear, (1, 8, 8, 3))
  assert shapes["up_0_1", "conv", "kernel"] == (1, 1, 8, 4)
  # Without deep supervision only X^{0,L} has a head.
  single = models.build("unet_pp", 2, depth=2, deep_supervision=False)
  assert {k[0] for k in param_shapes(single, (1, 8, 8, 3))
          if k[0].startswith("head")} == {"head_2"}
  for bad in [dict(prune_level=0), dict(prune_level=3), dict(upsample="x"),
              dict(norm="group"), dict(depth=0)]:
    with pytest.raises(ConfigError):
      models.build("unet_pp", 2, **{"depth": 2, **bad})


# One small deep-supervised model, initialised once for the tests below.
DEPTH = 3
SMALL = dict(depth=DEPTH, base_width=8)


@pytest.fixture(scope="module")
def small_model():
  model = models.build("unet_pp", 3, **SMALL)
  # Eager init compiles less than jit(init) for this model (op compilations
  # are cached across nodes of equal shapes); the params do not depend on H, W.
  return model, model.init(make_key(0), jnp.zeros((1, 8, 8, 3)))


def test_accurate_mode_pruning_and_fast_mode(small_model):
  depth = DEPTH
  full, variables = small_model
  # Not a multiple of 2**depth: padding must not break the equalities.
  images = np.random.default_rng(0).normal(size=(2, 20, 27, 3)).astype(
      np.float32)
  out = jax.jit(full.apply)(variables, images)
  assert len(out["aux"]) == depth
  for aux in out["aux"]:
    assert aux.shape == (2, 20, 27, 3) and aux.dtype == jnp.float32
  # Accurate mode: the mean of the L heads.
  np.testing.assert_allclose(out["logits"], np.mean(out["aux"], axis=0),
                             rtol=1e-6, atol=1e-6)
  assert not np.allclose(out["aux"][0], out["aux"][-1])

  full_flat = traverse_util.flatten_dict(variables)
  flops, sizes = [], []
  for level in range(1, depth + 1):
    pruned = models.build("unet_pp", 3, prune_level=level, **SMALL)
    shapes = jax.eval_shape(lambda: pruned.init(make_key(0), images))
    shapes = traverse_util.flatten_dict(shapes)
    # UNet++ L^k: the nodes with i + j <= k, and only head k.
    assert nodes_of({k[1:]: v for k, v in shapes.items()}) == {
        f"X_{i}_{j}" for i in range(level + 1) for j in range(level + 1 - i)}
    # A subset of the full model's variables, with the same names and shapes.
    assert set(shapes) < set(full_flat)
    for path, leaf in shapes.items():
      assert leaf.shape == full_flat[path].shape, path
    sub = traverse_util.unflatten_dict({p: full_flat[p] for p in shapes})
    apply = jax.jit(pruned.apply)
    pruned_out = apply(sub, images)
    assert set(pruned_out) == {"logits"}
    # Fast mode: exactly the full model's head k, for the same weights.
    np.testing.assert_allclose(pruned_out["logits"], out["aux"][level - 1],
                               rtol=1e-5, atol=1e-5)
    flops.append(apply.lower(sub, images).cost_analysis()["flops"])
    sizes.append(sum(np.prod(v.shape) for v in shapes.values()))
  # Pruning is what makes inference cheaper.
  assert flops == sorted(flops) and len(set(flops)) == depth, flops
  assert sizes == sorted(sizes) and len(set(sizes)) == depth, sizes

  # Without deep supervision the model is UNet++ L^L: the same sub-network,
  # whose output the loop above compared with the last head.
  single = models.build("unet_pp", 3, deep_supervision=False, **SMALL)
  assert (param_shapes(single, images.shape)
          == param_shapes(pruned, images.shape))


# ----------------------------------------------------------------------------
# It learns.


def test_unet_pp_learns_squares_with_deep_supervision(small_model):
  images, labels = squares_batch()
  model, variables = small_model
  # Deep supervision: every head gets its own loss (the paper's).
  loss = lambda outputs: sum(losses.cross_entropy(h, labels)
                             for h in outputs["aux"]) / len(outputs["aux"])
  history = train_losses(model, images, labels, 60, 1e-2, variables, loss)
  assert history[-1] <= 0.1 * history[0], history[::10]
