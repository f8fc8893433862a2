"""DeepLab v1 (LargeFOV) and ParseNet: output stride 8, fc6's atrous field,
the exact x8 upsampling, the dense-CRF option, ParseNet's global context.

The learning tests are in test_vgg_seed_learning.py.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import models
from segjax.errors import ConfigError
from segjax.models import deeplab
from segjax.models import parsenet

TINY = dict(widths=(4,) * 5, stage_sizes=(1,) * 5, fc_width=8)


def make_key(seed):
  return jax.random.key(seed, impl="rbg")


def init(model, images):
  return jax.jit(lambda x: model.init(make_key(0), x))(images)


def recording(model, names, replace=None):
  """A jitted apply returning {"outputs", name: (input, output)} of the
  submodules called `names`; replace maps a name to the input it gets."""
  replace = replace or {}

  @jax.jit
  def run(variables, images):
    record = {}

    def interceptor(next_fun, args, kwargs, context):
      name = context.module.name
      if context.method_name == "__call__" and name in replace:
        args = (replace[name],) + tuple(args[1:])
      out = next_fun(*args, **kwargs)
      if context.method_name == "__call__" and name in names:
        record[name] = (args[0], out)
      return out

    with nn.intercept_methods(interceptor):
      record["outputs"] = model.apply(variables, images)
    return record

  return run


def test_output_stride_8_and_caffe_sizes():
  model = models.build("deeplab_v1", 3, **TINY)
  run = recording(model, {"fc8"})
  # 8k + 1 inputs give k + 1 scores (the paper's 321 -> 41); others are
  # padded up to the next 8k + 1.
  for size, scores in [((321, 41), (41, 6)), ((64, 77), (9, 11))]:
    images = jnp.zeros((1, size[0], size[1], 3))
    rec = jax.eval_shape(
        lambda x: run(model.init(make_key(0), x), x), images)
    assert rec["fc8"][1].shape[1:3] == scores
    assert rec["outputs"]["logits"].shape == (1, *size, 3)


def test_upsampling_puts_score_pixel_i_on_input_pixel_8i():
  scores = np.zeros((1, 4, 3, 1), np.float32)
  scores[0, 2, 1, 0] = 1.0
  up = np.asarray(deeplab.upsample_by_8(jnp.asarray(scores)))[0, :, :, 0]
  assert up.shape == (25, 17)
  tent = lambda n, c: np.maximum(0, 1 - np.abs(np.arange(n) - c) / 8)
  np.testing.assert_allclose(up, np.outer(tent(25, 16), tent(17, 8)),
                             atol=1e-6)


def test_fc6_has_dilation_12():
  """An impulse into fc6 reaches only offsets in {-12, 0, 12}^2."""
  model = models.build("deeplab_v1", 3, **TINY)
  images = jnp.zeros((1, 8 * 30 + 1, 8 * 30 + 1, 3))   # pool5 is 31 x 31
  variables = init(model, images)
  probe = np.zeros((1, 31, 31, 4), np.float32)
  probe[0, 15, 15, :] = 1.0
  run = recording(model, {"fc6"}, replace={"fc6": jnp.asarray(probe)})
  _, out = run(variables, images)["fc6"]
  bias = variables["params"]["backbone"]["fc6"]["bias"]
  reached = np.any(np.abs(np.asarray(out - bias)) > 0, axis=(0, 3))
  expected = np.zeros((31, 31), bool)
  for dy in (-12, 0, 12):
    for dx in (-12, 0, 12):
      expected[15 + dy, 15 + dx] = True
  np.testing.assert_array_equal(reached, expected)


def test_paper_layers():
  model = models.build("deeplab_v1", 21)
  params = jax.eval_shape(lambda: model.init(
      make_key(0), jnp.zeros((1, 65, 65, 3))))["params"]
  backbone = params["backbone"]
  assert backbone["fc6"]["kernel"].shape == (3, 3, 512, 1024)
  assert backbone["fc7"]["kernel"].shape == (1, 1, 1024, 1024)
  assert params["fc8"]["kernel"].shape == (1, 1, 1024, 21)
  assert backbone["features"]["conv5_3"]["kernel"].shape == (3, 3, 512, 512)


def test_crf_option():
  kwargs = dict(TINY, crf_kwargs={"num_iters": 3})
  plain = models.build("deeplab_v1", 3, **TINY)
  with_crf = models.build("deeplab_v1", 3, crf=True, **kwargs)
  images = jax.random.normal(make_key(1), (2, 24, 20, 3))
  variables = init(plain, images)
  # The default CRF image de-normalises with mean/std.
  rgb = images * jnp.asarray(deeplab.IMAGENET_STD) + jnp.asarray(
      deeplab.IMAGENET_MEAN)

  @jax.jit
  def run(variables, images, rgb):
    return (plain.apply(variables, images)["logits"],
            with_crf.apply(variables, images),
            with_crf.apply(variables, images, crf_image=rgb)["logits"],
            # Training never runs the CRF.
            with_crf.apply(variables, images, train=True,
                           rngs={"dropout": make_key(2)}))

  unary, out, given, train = run(variables, images, rgb)
  # Same shapes; the logits are log-probabilities of the CRF marginals.
  assert out["logits"].shape == unary.shape == (2, 24, 20, 3)
  assert out["logits"].dtype == jnp.float32
  np.testing.assert_allclose(jax.nn.logsumexp(out["logits"], axis=-1), 0,
                             atol=1e-5)
  np.testing.assert_allclose(out["unary_logits"], unary, atol=1e-4)
  assert not np.allclose(jax.nn.softmax(out["logits"]),
                         jax.nn.softmax(unary), atol=1e-3)
  np.testing.assert_allclose(given, out["logits"], atol=1e-4)
  assert set(train) == {"logits"}
  with pytest.raises(ConfigError, match="crf_kwargs"):
    models.build("deeplab_v1", 3, crf=True, crf_kwargs={"iters": 3})


# --- ParseNet -----------------------------------------------------------------


def test_l2_norm_scale():
  x = jax.random.normal(make_key(3), (2, 3, 4, 6)) * 50
  module = parsenet.L2NormScale(10.0)
  variables = module.init(make_key(0), x)
  np.testing.assert_array_equal(variables["params"]["scale"], 10.0)
  y = module.apply(variables, x)
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), 10.0, rtol=1e-5)
  scale = jnp.arange(1.0, 7.0)
  y = module.apply({"params": {"scale": scale}}, x)
  np.testing.assert_allclose(
      y, x / jnp.linalg.norm(x, axis=-1, keepdims=True) * scale, rtol=1e-5)
  zeros = module.apply(variables, jnp.zeros((1, 6)))
  assert np.all(np.isfinite(zeros)) and not np.any(zeros)


def test_parsenet_layers():
  model = models.build("parsenet", 21)
  params = jax.eval_shape(lambda: model.init(
      make_key(0), jnp.zeros((1, 65, 65, 3))))["params"]
  assert params["pool6_norm"]["scale"].shape == (1024,)
  assert params["fc7_norm"]["scale"].shape == (1024,)
  assert params["score"]["kernel"].shape == (1, 1, 2048, 21)
  assert params["backbone"]["fc6"]["kernel"].shape == (3, 3, 512, 1024)


def test_parsenet_global_context_reaches_beyond_the_local_field():
  """A change in one corner moves ParseNet's scores in the opposite corner
  (through the global average), DeepLab v1's with the same trunk not."""
  size = 8 * 40 + 1
  images = np.asarray(jax.random.normal(make_key(4), (1, size, size, 3)))
  changed = images.copy()
  changed[0, :16, :16] += 3.0
  both = jnp.asarray(np.concatenate([images, changed]))
  for name, moves in [("deeplab_v1", False), ("parsenet", True)]:
    model = models.build(name, 3, **TINY)
    logits = jax.jit(model.apply)(init(model, both), both)["logits"]
    delta = np.abs(np.asarray(logits[0] - logits[1]))[-16:, -16:]
    assert (delta.max() > 1e-4) == moves, (name, delta.max())
