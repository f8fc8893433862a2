"""`dtype="bfloat16"` computes in bfloat16 and keeps everything it stores in
float32, and trains like float32 within a stated tolerance."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from segjax import config as config_lib
from segjax import losses
from segjax.tasks import semantic
from segjax.train import loop, optim, parallel, steps
from segjax.train.state import init_state

STEPS = 4
# Measured (the tiny U-Net of configs/unet_shapes.py:tiny, 4 SGD steps of lr
# 0.1; SGD, so that the difference is the gradients', not Adam's sign-like
# steps on near-zero gradients): the losses differ by 2.7e-3 relative at
# most, the parameters by 0.21 of the float32 run's change (L2 norms): the
# bfloat16 gradients are that noisy, not biased (the losses still agree).
LOSS_RTOL = 6e-3
PARAM_RTOL = 0.35  # of the L2 norm of the float32 run's parameter change


def _run(dtype):
  config = config_lib.load_config(os.path.join(REPO, "configs", "unet_shapes.py:tiny"),
                                  [f"dtype={dtype}", "optimizer.name=sgd",
                                   "optimizer.learning_rate=0.1"])
  par = parallel.Parallel("jit", parallel.make_mesh(jax.devices()[:2]))
  model = loop.build_model(config)
  tx, schedule = optim.make_optimizer(config.optimizer, config.train.steps)
  start = jax.device_get(init_state(model, tx, jax.random.PRNGKey(0), (32, 32, 3)))
  state = par.put_state(start)
  train = par.compile(steps.train_step, model=model, tx=tx, schedule=schedule,
                      objective=semantic.make_objective(losses.make_loss(config.loss)))
  rng = np.random.default_rng(0)
  seen = []
  for _ in range(STEPS):
    label = rng.integers(0, config.num_classes, (8, 32, 32)).astype(np.int32)
    label[:, :3] = 255
    image = rng.normal(size=(8, 32, 32, 3)).astype(np.float32)
    image[..., 0] += label.clip(0, config.num_classes)
    state, metrics = train(state, par.put_batch({"image": image, "label": label}),
                           par.put_replicated(jax.random.PRNGKey(1)))
    seen.append(float(par.fetch(metrics)["loss"]))
  return start.params, state, seen


@pytest.fixture(scope="module")
def runs():
  return _run("float32"), _run("bfloat16")


def test_bfloat16_step_stores_float32(runs):
  _, (_, state, _) = runs
  for part in ("params", "batch_stats", "opt_state"):
    leaves = [x for x in jax.tree_util.tree_leaves(getattr(state, part))
              if jnp.issubdtype(x.dtype, jnp.floating)]
    assert leaves, part
    assert all(x.dtype == jnp.float32 for x in leaves), part
  assert jax.tree_util.tree_leaves(state.batch_stats)  # the U-Net has BN


def test_bfloat16_trains_like_float32(runs):
  (start, state32, loss32), (_, state16, loss16) = runs
  assert int(state16.step) == STEPS and int(state16.nonfinite) == 0
  # What training moved, and how far bfloat16 lands from float32 (L2 norms
  # over all parameters).
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])
  moved = np.linalg.norm(flat(state32.params) - flat(start))
  apart = np.linalg.norm(flat(state16.params) - flat(state32.params))
  loss_error = np.max(np.abs(np.subtract(loss16, loss32)) / np.asarray(loss32))
  print(f"bfloat16 vs float32: losses {loss_error:.1e} relative, parameters "
        f"{apart / moved:.1e} of the float32 run's change")
  assert moved > 0
  assert loss_error < LOSS_RTOL
  assert apart / moved < PARAM_RTOL
