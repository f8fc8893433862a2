"""8-device jit == 1-device jit == pmap: the same global batch trains alike."""
import jax
import ml_collections
import numpy as np
import pytest

from segjax import losses, models
from segjax.tasks import semantic
from segjax.train import optim, parallel, steps
from segjax.train.state import init_state

NUM_CLASSES = 3
STEPS = 5


def _optimizer():
  opt = ml_collections.ConfigDict(dict(
      name="sgd", learning_rate=0.05, schedule="poly", warmup_steps=2,
      weight_decay=1e-4, momentum=0.9, grad_clip_norm=1.0, end_factor=0.0,
      poly_power=0.9))
  return optim.make_optimizer(opt, STEPS)


def _batches(batch_size=8, size=32):
  rng = np.random.default_rng(0)
  for _ in range(STEPS):
    label = rng.integers(0, NUM_CLASSES, (batch_size, size, size)).astype(np.int32)
    label[:, :4] = 255  # ignore pixels, unevenly spread over devices
    label[0, :16] = 255
    image = rng.normal(size=(batch_size, size, size, 3)).astype(np.float32)
    image[..., 0] += label.clip(0, NUM_CLASSES)
    yield {"image": image, "label": label}


def _train(mode, num_devices, dropout=0.1):
  par = parallel.Parallel(mode, parallel.make_mesh(jax.devices()[:num_devices]))
  model = models.build("unet", NUM_CLASSES, depth=2, base_width=4, dropout=dropout,
                       bn_axis_name=par.axis_name)
  tx, schedule = _optimizer()
  state = init_state(model, tx, jax.random.PRNGKey(0), (32, 32, 3))
  state = par.put_state(jax.device_get(state))
  train = par.compile(steps.train_step, donate_first=True, model=model, tx=tx,
                      objective=semantic.make_objective(losses.make_loss("cross_entropy")),
                      schedule=schedule)
  rng = par.put_replicated(jax.random.PRNGKey(1))
  losses_seen = []
  for batch in _batches():
    state, m = train(state, par.put_batch(batch), rng)
    losses_seen.append(float(par.fetch(m)["loss"]))
  return par.host_state(state), losses_seen


def _assert_close(a, b, rtol=1e-5):
  # tree_map refuses trees of another structure, so a leaf one side dropped
  # (or added) fails too.
  def close(path, x, y):
    x, y = np.asarray(x), np.asarray(y)
    scale = max(np.abs(y).max(), 1e-6)
    np.testing.assert_allclose(x, y, rtol=0, atol=rtol * scale,
                               err_msg=jax.tree_util.keystr(path))
  jax.tree_util.tree_map_with_path(close, a, b)


@pytest.fixture(scope="module")
def one_device():
  return _train("jit", 1)


def test_eight_device_jit_matches_one_device(one_device):
  state1, loss1 = one_device
  state8, loss8 = _train("jit", 8)
  assert int(state8.step) == STEPS and int(state8.nonfinite) == 0
  _assert_close(state8.params, state1.params)
  _assert_close(state8.batch_stats, state1.batch_stats)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  # The run really trained: parameters moved away from the initialisation.
  assert loss1[-1] < loss1[0]


def test_pmap_matches_jit():
  # Without dropout: pmap draws each device's dropout mask from its own key,
  # jit draws one mask for the global batch, so only dropout-free runs agree.
  state1, loss1 = _train("jit", 1, dropout=0.0)
  state_p, loss_p = _train("pmap", 8, dropout=0.0)
  _assert_close(state_p.params, state1.params)
  _assert_close(state_p.batch_stats, state1.batch_stats)
  np.testing.assert_allclose(loss_p, loss1, rtol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_loss():
  par = parallel.Parallel("jit", parallel.make_mesh(jax.devices()[:2]))
  import jax.numpy as jnp
  model = models.build("unet", NUM_CLASSES, depth=2, base_width=4, dtype=jnp.bfloat16)
  tx, schedule = _optimizer()
  state = par.put_state(jax.device_get(
      init_state(model, tx, jax.random.PRNGKey(0), (32, 32, 3))))
  train = par.compile(steps.train_step, donate_first=True, model=model, tx=tx,
                      objective=semantic.make_objective(losses.make_loss("cross_entropy")),
                      schedule=schedule)
  batch = next(_batches())
  state, m = train(state, par.put_batch(batch), par.put_replicated(jax.random.PRNGKey(1)))
  assert m["loss"].dtype == jnp.float32 and np.isfinite(float(m["loss"]))
  leaves = jax.tree_util.tree_leaves(state.params)
  assert all(leaf.dtype == jnp.float32 for leaf in leaves)
  logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                       batch["image"], train=False)["logits"]
  assert logits.dtype == jnp.float32
