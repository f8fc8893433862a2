"""Optimizers against torch.optim, and per-module learning-rate factors
(optimizer.lr_mult)."""
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import needs
from segjax.errors import ConfigError
from segjax.train import optim


def sgd_config(**kw):
  opt = dict(name="sgd", learning_rate=0.1, schedule="constant", warmup_steps=0,
             weight_decay=0.0, momentum=0.0, grad_clip_norm=0.0)
  return ml_collections.ConfigDict({**opt, **kw})


def test_lr_mult_scales_only_the_named_module():
  params = {"backbone": {"w": jnp.ones((2, 2))}, "decode_head": {"w": jnp.ones((2, 2))}}
  grads = {"backbone": {"w": jnp.full((2, 2), 1.0)},
           "decode_head": {"w": jnp.full((2, 2), 1.0)}}
  tx, _ = optim.make_optimizer(sgd_config(lr_mult={"decode_head": 10.0}), 100)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["backbone"]["w"], -0.1)
  np.testing.assert_allclose(updates["decode_head"]["w"], -1.0, rtol=1e-6)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_lr_mult_of_one_changes_nothing(name):
  params = {"a": {"w": jnp.arange(4.0).reshape(2, 2)}, "b": {"w": jnp.ones((2, 2))}}
  grads = {"a": {"w": jnp.full((2, 2), 0.3)}, "b": {"w": jnp.full((2, 2), -2.0)}}
  plain, _ = optim.make_optimizer(sgd_config(name=name, weight_decay=0.01), 100)
  mult, _ = optim.make_optimizer(
      sgd_config(name=name, weight_decay=0.01, lr_mult={"b": 1.0}), 100)
  want, _ = plain.update(grads, plain.init(params), params)
  got, _ = mult.update(grads, mult.init(params), params)
  for k in params:
    np.testing.assert_allclose(got[k]["w"], want[k]["w"], rtol=1e-6)


def test_lr_mult_of_a_missing_module_names_the_modules():
  tx, _ = optim.make_optimizer(sgd_config(lr_mult={"head": 10.0}), 100)
  with pytest.raises(ConfigError, match="backbone"):
    tx.init({"backbone": {"w": jnp.ones(2)}})


def test_step_schedule_is_detectrons_multistep_with_warmup():
  # Mask R-CNN 1x in miniature: warmup 10 from lr/10, x0.1 at 60 and 80.
  lr, warmup = 0.02, 10
  _, schedule = optim.make_optimizer(sgd_config(
      learning_rate=lr, schedule="step", warmup_steps=warmup, milestones=(60, 80)), 90)
  def detectron(t):  # WarmupMultiStepLR, warmup factor 1/warmup, linear
    factor = 1.0 if t >= warmup else (1 / warmup) * (1 - t / warmup) + t / warmup
    return lr * factor * 0.1 ** sum(t >= m for m in (60, 80))
  for t in (0, 5, 9, 10, 59, 60, 79, 80, 89):
    np.testing.assert_allclose(float(schedule(t)), detectron(t), rtol=1e-5, err_msg=str(t))


def test_step_schedule_needs_milestones_after_the_warmup():
  for milestones in ((), (5, 60)):
    with pytest.raises(ConfigError, match="milestones"):
      optim.make_optimizer(sgd_config(schedule="step", warmup_steps=10,
                                      milestones=milestones), 90)


@pytest.mark.parametrize("name,torch_name", [("sgd", "SGD"), ("adam", "Adam"),
                                             ("adamw", "AdamW")])
def test_weight_decay_is_applied_as_torch_optim_applies_it(name, torch_name):
  """Five steps with weight decay equal torch.optim's on a matrix (no option
  is silently dropped: `adam` used to ignore weight_decay). A bias is not
  decayed, so torch gets it in a group of its own with weight_decay=0."""
  torch = needs("torch")
  rng = np.random.default_rng(0)
  w0, b0 = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)
  grads = [(rng.normal(size=(3, 4)).astype(np.float32),
            rng.normal(size=4).astype(np.float32)) for _ in range(5)]
  config = sgd_config(name=name, learning_rate=0.05, weight_decay=0.1, momentum=0.9)
  tx, _ = optim.make_optimizer(config, 100)
  params = {"w": jnp.asarray(w0), "b": jnp.asarray(b0)}
  state = tx.init(params)
  for gw, gb in grads:
    updates, state = tx.update({"w": jnp.asarray(gw), "b": jnp.asarray(gb)}, state, params)
    params = {k: params[k] + updates[k] for k in params}

  tw, tb = torch.tensor(w0, requires_grad=True), torch.tensor(b0, requires_grad=True)
  extra = {"momentum": 0.9} if name == "sgd" else {}
  opt = getattr(torch.optim, torch_name)(
      [{"params": [tw], "weight_decay": 0.1}, {"params": [tb], "weight_decay": 0.0}],
      lr=0.05, **extra)
  for gw, gb in grads:
    tw.grad, tb.grad = torch.tensor(gw), torch.tensor(gb)
    opt.step()
  np.testing.assert_allclose(params["w"], tw.detach().numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(params["b"], tb.detach().numpy(), rtol=1e-5, atol=1e-6)
