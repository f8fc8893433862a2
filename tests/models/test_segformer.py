"""SegFormer and its MiT encoder: sizes, conv arithmetic, the decoder's two
orders of operations, train-only randomness, bfloat16, learning.

The generic contract is in test_contract.py; parity with Hugging Face's
SegformerForSemanticSegmentation in tests/test_convert_huggingface.py.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest
from flax import traverse_util

from learning import squares_batch, train_losses  # pylint: disable=import-error
from segjax import models
from segjax.errors import ConfigError
from segjax.models import segformer
from segjax.models.attention import drop_path_rates
from segjax.models.backbones import mit

NUM_CLASSES = 3
# Four stages, one block each, widths 8..16: the paper's models' structure,
# small enough to compile in seconds on one CPU core.
TINY = dict(hidden_sizes=(8, 16, 16, 16), depths=(1, 1, 1, 1),
            num_heads=(1, 2, 2, 2), decoder_width=16)
# Two stages (the first with spatial reduction, the second without): every
# layer type, for the tests that compile gradients or several variants.
TWO_STAGES = dict(hidden_sizes=(8, 16), depths=(1, 1), num_heads=(1, 2),
                  sr_ratios=(2, 1), mlp_ratios=(4, 4), patch_sizes=(7, 3),
                  strides=(4, 2), decoder_width=16)


def make_key(seed):
  # rbg compiles much faster than threefry on XLA:CPU; the stream is irrelevant.
  return jax.random.key(seed, impl="rbg")


def shapes_of(model, size, **kwargs):
  """(variables, outputs) as ShapeDtypeStructs: traced, nothing computed."""
  images = jax.ShapeDtypeStruct((1, *size, 3), jnp.float32)
  variables = jax.eval_shape(
      lambda x: model.init(make_key(0), x, train=False), images)
  outputs = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, **kwargs), variables, images)
  return variables, outputs


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def random_images(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# --- sizes (shapes only) ---------------------------------------------------


@pytest.mark.parametrize("name,params,decoder", [
    # Hugging Face's SegformerForSemanticSegmentation with num_labels=150
    # has exactly these counts (checked in test_convert_huggingface.py).
    ("segformer_b0", 3_752_694, 256),
    ("segformer_b5", 84_708_694, 768),
])
def test_paper_sizes(name, params, decoder):
  model = models.build(name, 150)
  variables, outputs = shapes_of(model, (512, 512))
  assert count(variables["params"]) == params
  assert set(variables["params"]) == {"backbone", "decode_head"}
  assert outputs["logits"].shape == (1, 512, 512, 150)
  assert outputs["logits"].dtype == jnp.float32
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  size = name[-2:]
  widths, depths = mit.SIZES[size]["hidden_sizes"], mit.SIZES[size]["depths"]
  for s, (width, depth) in enumerate(zip(widths, depths)):
    assert flat[f"backbone/patch_embed{s}/proj/kernel"].shape[-1] == width
    assert f"backbone/block{s}_{depth - 1}/norm1/scale" in flat
    assert f"backbone/block{s}_{depth}/norm1/scale" not in flat
    assert flat[f"decode_head/linear_c{s}/kernel"].shape == (width, decoder)
    # Mix-FFN: 4x wide, depthwise 3x3.
    assert flat[f"backbone/block{s}_0/ffn/dwconv/kernel"].shape == (
        3, 3, 1, 4 * width)
  # Spatial reduction 8, 4, 2 in stages 0..2; none in the last.
  assert flat["backbone/block0_0/attn/sr/kernel"].shape[:2] == (8, 8)
  assert "backbone/block3_0/attn/sr/kernel" not in flat
  assert flat["decode_head/linear_fuse/kernel"].shape == (1, 1, 4 * decoder,
                                                          decoder)


def test_feature_sizes_follow_pytorch_conv_arithmetic():
  """Stride 4 then 2, 2, 2 with padding k // 2: floor((H - 1) / s) + 1 rows,
  e.g. 66 x 50 -> 17 x 13, 9 x 7, 5 x 4, 3 x 2 (HF's sizes)."""
  encoder = mit.MiTB0()
  _, features = shapes_of(encoder, (66, 50))
  assert {k: v.shape for k, v in features.items()} == {
      "c2": (1, 17, 13, 32), "c3": (1, 9, 7, 64), "c4": (1, 5, 4, 160),
      "c5": (1, 3, 2, 256)}
  assert encoder.channels == {"c2": 32, "c3": 64, "c4": 160, "c5": 256}
  assert encoder.feature_strides == {"c2": 4, "c3": 8, "c4": 16, "c5": 32}
  _, outputs = shapes_of(models.build("segformer_b0", 5), (66, 50))
  assert outputs["logits"].shape == (1, 66, 50, 5)


def test_drop_path_rates_rise_linearly_over_all_blocks():
  rates = drop_path_rates(0.1, mit.SIZES["b2"]["depths"])
  flat = [r for stage in rates for r in stage]
  assert len(flat) == 16 and flat[0] == 0.0
  np.testing.assert_allclose(flat[-1], 0.1)
  np.testing.assert_allclose(np.diff(flat), 0.1 / 15)


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_heads=(1, 2, 3, 8)), "heads"),  # 160 channels, 3 heads
    (dict(sr_ratios=(8, 4, 2)), "one value per stage"),
    (dict(attention_impl="flash"), "attention_impl"),
    (dict(decoder_impl="sum"), "decoder_impl"),
    (dict(dwconv_impl="cudnn"), "dwconv_impl"),
])
def test_bad_options_are_refused(kwargs, message):
  with pytest.raises(ConfigError, match=message):
    models.build("segformer_b0", 3, **kwargs)


# --- numerics ----------------------------------------------------------------


def random_variables(model, images, seed=0):
  """Random values of the model's variables' shapes (no init to compile);
  BatchNorm variances positive."""
  shapes, _ = shapes_of(model, images.shape[1:3])
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(shapes)
  return traverse_util.unflatten_dict({
      path: (1.0 + rng.random(s.shape) if path[-1] == "var" else
             0.3 * rng.normal(size=s.shape)).astype(np.float32)
      for path, s in flat.items()})


def test_shifted_depthwise_conv_equals_grouped_conv():
  """Mix-FFN's depthwise 3x3 as nine shifted multiply-adds (the CPU form)
  is nn.Conv(C, (3, 3), feature_group_count=C): params, values, gradients."""
  x = random_images((2, 7, 5, 6))
  flax_conv = nn.Conv(6, (3, 3), padding=((1, 1), (1, 1)),
                      feature_group_count=6)
  variables = flax_conv.init(make_key(0), x)
  variables = jax.tree_util.tree_map(lambda a: a + 0.1, variables)  # bias != 0

  def loss(module, v, x):
    return jnp.sum(jnp.sin(module.apply(v, x)))

  reference = jax.value_and_grad(lambda v, x: loss(flax_conv, v, x),
                                 argnums=(0, 1))(variables, x)
  for impl in ("shift", "xla"):
    got = jax.jit(jax.value_and_grad(
        lambda v, x: loss(mit.DepthwiseConv3x3(6, impl), v, x),
        argnums=(0, 1)))(variables, x)
    # Structure and values: a gradient that lost a leaf fails too.
    chex.assert_trees_all_close(got, reference, rtol=1e-5, atol=1e-5)


def test_fast_decoder_equals_hf_order():
  """The fuse conv folded into the projections (before the upsampling) is
  the same function as HF's concatenate-then-fuse, on the same params."""
  images = random_images((2, 66, 50, 3))
  fast = models.build("segformer_b0", NUM_CLASSES, **TINY)
  concat = models.build("segformer_b0", NUM_CLASSES, decoder_impl="concat",
                        **TINY)
  variables = random_variables(fast, images)
  run = lambda m: jax.jit(lambda v, x: m.apply(v, x)["logits"])(
      variables, images)
  with jax.default_matmul_precision("highest"):
    a, b = run(fast), run(concat)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_randomness_only_in_training():
  """Dropout and stochastic depth act in training only: inference needs no
  PRNG and is deterministic; training differs from key to key, in the
  encoder alone too (stochastic depth)."""
  images = random_images((2, 32, 32, 3))
  model = models.build("segformer_b0", NUM_CLASSES, drop_path_rate=0.5,
                       dropout=0.5, **TWO_STAGES)
  variables = random_variables(model, images)
  infer = jax.jit(lambda v: model.apply(v, images)["logits"])
  np.testing.assert_array_equal(infer(variables), infer(variables))

  @jax.jit
  def train(v, key):
    out, _ = model.apply(v, images, train=True, mutable=["batch_stats"],
                         rngs={"dropout": key})
    encoder = mit.MixTransformer(**segformer.encoder_options(model))
    return out["logits"], encoder.apply(
        {"params": v["params"]["backbone"]}, images, train=True,
        rngs={"dropout": key})

  (a, features_a), (b, features_b) = (train(variables, make_key(k))
                                      for k in (1, 2))
  assert not np.allclose(a, b)
  assert not np.allclose(features_a["c3"], features_b["c3"])


def test_bfloat16_computes_in_bfloat16_with_float32_params_and_logits():
  images = random_images((1, 40, 48, 3))
  model32 = models.build("segformer_b0", NUM_CLASSES, **TWO_STAGES)
  model16 = models.build("segformer_b0", NUM_CLASSES, dtype="bfloat16",
                         **TWO_STAGES)
  variables = jax.eval_shape(lambda: model16.init(make_key(0), images))
  assert all(leaf.dtype == jnp.float32
             for leaf in jax.tree_util.tree_leaves(variables))
  variables = random_variables(model32, images)
  jaxpr = jax.make_jaxpr(lambda v, x: model16.apply(v, x))(variables, images)
  assert "bf16" in str(jaxpr)
  want = jax.jit(lambda v, x: model32.apply(v, x)["logits"])(variables, images)
  got = jax.jit(lambda v, x: model16.apply(v, x)["logits"])(variables, images)
  assert got.dtype == jnp.float32 and got.shape == (1, 40, 48, NUM_CLASSES)
  assert np.abs(np.asarray(got) - want).max() < 0.05 * np.abs(want).max()


def test_learns_squares():
  """Train mode (stochastic depth 0.1, dropout 0.1) on one fixed batch: the
  loss falls by >= 90 % in 40 Adam steps. Two stages: a 4-stage gradient
  takes XLA:CPU ~10 s longer to compile and adds no new layer type."""
  model = models.build("segformer_b0", NUM_CLASSES, **TWO_STAGES)
  images, labels = squares_batch()
  history = train_losses(model, images, labels, 40, 1e-2)
  # The mean of the last steps: Adam's steps make single losses jumpy.
  assert np.mean(history[-5:]) <= 0.1 * history[0], history[::5]
