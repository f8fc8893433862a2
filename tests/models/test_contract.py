"""The contract every semantic model in segjax.models.MODELS honours.

Parametrised over the registry, so a newly registered model is tested without
touching this file; add an entry to MODEL_KWARGS only to make it small enough
for a CPU test.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import losses
from segjax import models
from segjax.errors import ConfigError

# Per-model options that keep the test fast on CPU.
MODEL_KWARGS = {
    "unet": dict(base_width=8, depth=3),
    "unet_pp": dict(base_width=4, depth=2),
    # The contract's loss reads "logits" only, so the deep-supervision heads
    # would get no gradient; test_unet3p.py trains and checks them.
    "unet3p": dict(base_width=4, depth=2, deep_supervision=False),
    "fcn_resnet50": dict(stage_sizes=(1, 1, 1, 1), width=8),
    "deeplab_v3_resnet50": dict(stage_sizes=(1, 1, 1, 1), width=8),
    # The ResNet-101 variants are the same modules with more blocks.
    "fcn_resnet101": dict(stage_sizes=(1, 1, 1, 1), width=8),
    "deeplab_v3_resnet101": dict(stage_sizes=(1, 1, 1, 1), width=8),
    # Zero-initialised score layers (the paper's) would leave the trunk
    # without gradient at step 0; test_fcn.py checks the zero init.
    # VGG-16's 13 convs take XLA:CPU ~10 s to compile with gradients; one
    # conv per stage keeps every layer type. The same for all VGG models.
    "fcn32s": dict(widths=(4,) * 5, stage_sizes=(1,) * 5, fc_width=8,
                   zero_init_scores=False),
    "fcn16s": dict(widths=(4,) * 5, stage_sizes=(1,) * 5, fc_width=8,
                   zero_init_scores=False),
    "fcn8s": dict(widths=(4,) * 5, stage_sizes=(1,) * 5, fc_width=8,
                  zero_init_scores=False),
    "deconvnet": dict(widths=(4,) * 5, stage_sizes=(1,) * 5, fc_width=8),
    "segnet": dict(widths=(4,) * 5, stage_sizes=(1,) * 5),
    "deeplab_v1": dict(widths=(4,) * 5, stage_sizes=(1,) * 5, fc_width=8),
    "parsenet": dict(widths=(4,) * 5, stage_sizes=(1,) * 5, fc_width=8),
    # One block per stage (multi-grid needs one rate per last-stage block).
    "deeplab_v2": dict(stage_sizes=(1, 1, 1, 1), width=4),
    "deeplab_v3": dict(stage_sizes=(1, 1, 1, 1), width=4, multi_grid=None,
                       aspp_channels=8),
    "deeplab_v3_plus": dict(stage_sizes=(1, 1, 1, 1), width=4,
                            multi_grid=None, aspp_channels=8,
                            low_level_channels=4, decoder_channels=8),
    # SegFormer's six sizes are one module (test_segformer.py runs 4 stages).
    # XLA:CPU compiles ~4 s per stage: b0 has two stages and every layer
    # type; b1..b5 the cheapest model (one stage, no spatial reduction, no
    # dropout or stochastic depth, the grouped-conv form of the dwconv).
    "segformer_b0": dict(hidden_sizes=(8, 16), depths=(1, 1), num_heads=(1, 2),
                         sr_ratios=(2, 1), mlp_ratios=(4, 4),
                         patch_sizes=(7, 3), strides=(4, 2), decoder_width=16),
    **{f"segformer_b{i}": dict(hidden_sizes=(8,), depths=(1,), num_heads=(1,),
                               sr_ratios=(1,), mlp_ratios=(4,), patch_sizes=(7,),
                               strides=(4,), decoder_width=16, dropout=0.0,
                               drop_path_rate=0.0, dwconv_impl="xla")
       for i in range(1, 6)},
    # ViT width 32, 4 blocks, a 4 x 4 stored position grid (resized to the
    # inputs' 4 x 4 and 5 x 4 grids; 66 x 50 pads to 80 x 64).
    **{name: dict(width=32, depth=4, num_heads=2, pretrain_grid=(4, 4),
                  channels=8, mla_head_channels=8)
       for name in ("setr_naive", "setr_pup", "setr_mla")},
}
NUM_CLASSES = 3
BATCH = 2
# The second size is not a multiple of 8 or 32, the strides models use.
SIZES = [(64, 64), (66, 50)]


def make_key(seed):
  # The rbg PRNG compiles several times faster than threefry on XLA:CPU, and
  # model init is most of this file's compile time; the stream is irrelevant.
  return jax.random.key(seed, impl="rbg")


@pytest.fixture(scope="module", params=sorted(models.MODELS))
def built(request):
  """(name, model, variables), initialised once per model."""
  name = request.param
  model = models.build(name, NUM_CLASSES, **MODEL_KWARGS.get(name, {}))
  images = jnp.zeros((BATCH, *SIZES[0], 3), jnp.float32)
  variables = jax.jit(lambda x: model.init(make_key(0), x, train=False))(images)
  return name, model, variables


def random_batch(seed, size):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(BATCH, *size, 3)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, size=(BATCH, *size)).astype(np.int32)
  labels[:, :2] = 255  # some ignored pixels
  return images, labels


def test_params_are_float32(built):
  _, _, variables = built
  for leaf in jax.tree_util.tree_leaves(variables):
    assert leaf.dtype == jnp.float32


@pytest.mark.parametrize("size", SIZES)
def test_forward_under_jit(built, size):
  _, model, variables = built
  images, _ = random_batch(0, size)
  outputs = jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, images)
  assert isinstance(outputs, dict)
  logits = outputs["logits"]
  assert logits.shape == (BATCH, *size, NUM_CLASSES)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  for aux in outputs.get("aux", []):
    assert aux.shape[:1] == (BATCH,) and aux.dtype == jnp.float32


def test_train_step_gradients_and_batch_stats(built):
  name, model, variables = built
  images, labels = random_batch(1, SIZES[1])
  params = variables["params"]
  state = {k: v for k, v in variables.items() if k != "params"}
  loss_fn_of = losses.make_loss({"name": "cross_entropy"})

  def loss_fn(params):
    outputs, new_state = model.apply(
        {"params": params, **state}, images, train=True,
        mutable=list(state), rngs={"dropout": make_key(1)})
    return loss_fn_of(outputs, {"label": labels}), new_state

  (loss, new_state), grads = jax.jit(
      jax.value_and_grad(loss_fn, has_aux=True))(params)
  assert np.isfinite(float(loss)) and float(loss) > 0
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  assert flat
  for path, grad in flat:
    assert np.all(np.isfinite(grad)), f"{name}: non-finite grad at {path}"
    assert np.any(grad != 0), f"{name}: zero grad at {path}"
  if "batch_stats" in state:
    before = jax.tree_util.tree_leaves(state["batch_stats"])
    after = jax.tree_util.tree_leaves(new_state["batch_stats"])
    assert len(before) == len(after) > 0
    assert all(not np.allclose(a, b) for a, b in zip(before, after))


def test_build_rejects_unknown_name_and_option():
  with pytest.raises(ConfigError) as err:
    models.build("no_such_model", NUM_CLASSES)
  for name in models.available():
    assert name in str(err.value)
  name = models.available()[0]
  with pytest.raises(ConfigError, match="no option"):
    models.build(name, NUM_CLASSES, no_such_option=1)


def test_list_options_from_a_json_config_become_hashable_tuples():
  # config.json turns tuples into lists; the module is a static jit argument.
  model = models.build("deeplab_v3", num_classes=3, multi_grid=[1, 2, 4])
  assert model.multi_grid == (1, 2, 4)
  hash(model)
