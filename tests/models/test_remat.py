"""model_kwargs.remat: the same outputs and gradients, less memory.

Each family is built twice from the same options, once with remat=True,
and both are differentiated on the same batch and params; remat changes
what the backward pass stores, never what it computes.
"""
import chex
import jax
import jax.numpy as jnp
import pytest

from conftest import tiny_config
from segjax import models
from segjax.models.detection.mask_rcnn import TINY, MaskRCNN
from segjax.models.remat import KEEP_REMAT
from segjax.train import loop

# Small variants of each family with a remat option (name, options, size).
FAMILIES = {
    "unet": ("unet", dict(depth=2, base_width=4), 16),
    "resnet": ("fcn_resnet50", dict(stage_sizes=(1, 1, 1, 1), width=4), 16),
    "segformer": ("segformer_b0", dict(
        hidden_sizes=(8, 16), depths=(1, 1), num_heads=(1, 2), sr_ratios=(2, 1),
        mlp_ratios=(2, 2), patch_sizes=(7, 3), strides=(4, 2), decoder_width=8), 16),
    "setr": ("setr_naive", dict(width=16, depth=2, num_heads=2, channels=8,
                                pretrain_grid=(2, 2), drop_path_rate=0.1), 16),
}


def _grads(model, variables, images, weights):
  """(outputs' logits, new batch_stats, grads of a weighted logit sum)."""
  def objective(params):
    out, updates = model.apply({**variables, "params": params}, images, train=True,
                               mutable=["batch_stats"],
                               rngs={"dropout": jax.random.PRNGKey(3)})
    return jnp.sum(out["logits"] * weights), (out["logits"], updates)

  grads, (logits, updates) = jax.jit(jax.grad(objective, has_aux=True))(
      variables["params"])
  return logits, updates, grads


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_same_outputs_and_gradients(family):
  name, options, size = FAMILIES[family]
  plain = models.build(name, 3, **options)
  remat = models.build(name, 3, remat=True, **options)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, 3))
  variables = jax.jit(lambda x: plain.init(jax.random.PRNGKey(1), x, train=False))(images)
  # Params are the same tree: checkpoints move between the two settings.
  chex.assert_trees_all_equal_shapes(
      variables, jax.eval_shape(lambda x: remat.init(jax.random.PRNGKey(1), x), images))
  weights = jax.random.normal(jax.random.PRNGKey(2), (2, size, size, 3))
  expected = _grads(plain, variables, images, weights)
  got = _grads(remat, variables, images, weights)
  # Recomputation may fuse (and so round) differently: float32 noise only.
  chex.assert_trees_all_close(got, expected, rtol=1e-4, atol=1e-4)


def test_mask_rcnn_remat_reaches_backbone():
  """Mask R-CNN passes remat to its ResNet: its gradient checkpoints every
  Bottleneck (the blocks are the ResNet's, compared numerically above)."""
  def remats(remat):
    model = models.build("mask_rcnn_r50_fpn", 4, remat=remat, **TINY)
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(1), x,
                                                    method=MaskRCNN.features), images)

    def objective(params, others, x):
      features = model.apply({**others, "params": params}, x, method=MaskRCNN.features)
      return sum(jnp.sum(f) for f in features.values())

    others = {k: v for k, v in variables.items() if k != "params"}
    jaxpr = jax.make_jaxpr(jax.grad(objective))(variables["params"], others, images)
    return str(jaxpr).count("remat")

  assert remats(False) == 0
  assert remats(True) >= sum(TINY["stage_sizes"])


def test_remat_lowers_xla_peak_memory():
  """XLA's own accounting of the compiled gradient: remat needs less scratch.

  Compiled as an accelerator compiles it: XLA:CPU would otherwise drop the
  barriers that keep the recomputation from being merged with the forward
  pass (segjax.models.remat.KEEP_REMAT).
  """
  def temp_bytes(remat):
    model = models.build("setr_naive", 3, width=64, depth=4, num_heads=2, channels=16,
                         remat=remat)
    images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), images)

    def loss(params, batch_stats, x):
      out, _ = model.apply({"params": params, "batch_stats": batch_stats}, x,
                           train=True, mutable=["batch_stats"])
      return jnp.mean(out["logits"] ** 2)

    compiled = jax.jit(jax.grad(loss)).lower(
        variables["params"], variables["batch_stats"], images).compile(KEEP_REMAT)
    return compiled.memory_analysis().temp_size_in_bytes

  plain, remat = temp_bytes(False), temp_bytes(True)
  assert remat < 0.6 * plain, (remat, plain)


def test_segjax_train_compiles_its_step_with_remat_kept(shapes_dir, tmp_path):
  """`segjax train` with model_kwargs.remat=True compiles its train step as
  an accelerator would (KEEP_REMAT): the step's scratch shrinks on CPU too
  (measured 6.9 MB -> 3.3 MB; without KEEP_REMAT 7.0 MB, no saving)."""
  def temp_bytes(remat):
    config = tiny_config(shapes_dir, "model_kwargs.base_width=8",
                         f"model_kwargs.remat={remat}")
    with loop.Trainer(config, str(tmp_path / str(remat)),
                      devices=jax.devices()[:1]) as trainer:
      state, _ = trainer.initial_state()
      batch = trainer.par.put_batch(next(iter(trainer.train_batches(0))))
      compiled = trainer.train_fn.lower(state, batch, jax.random.PRNGKey(0)).compile()
      return compiled.memory_analysis().temp_size_in_bytes

  plain, remat = temp_bytes(False), temp_bytes(True)
  assert remat < 0.7 * plain, (remat, plain)
