"""The generic compiled training step: one optimizer update of any task's
objective, with the NaN/Inf guard (`apply_gradients`).

What a kind of model adds (its loss, the inputs it reads) comes in as an
`objective` from its task module (segjax/tasks; docs/design.md, "Tasks");
this file imports no model.

The step is compiled by `segjax.train.parallel` either with `jax.jit` over a
device mesh (default: arrays are global, so means, gradients and BatchNorm
statistics are global without any collective here) or with `jax.pmap`
(`axis_name` set: each device's objective is its contribution to the global
one, and the contributions are summed with `psum`).
"""
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from segjax.train.state import TrainState

Metrics = Dict[str, jax.Array]
# objective(model, variables, batch, key, axis_name) -> (loss, parts, batch_stats):
# loss a float32 scalar (under pmap: this device's share of the global loss,
# so that the psum over devices is the global loss), parts a dict of float32
# scalars to log (shares likewise), batch_stats the BatchNorm statistics
# after the forward pass.
Objective = Callable[..., Tuple[jax.Array, Metrics, Any]]


def train_step(state: TrainState, batch: Dict[str, jax.Array], rng: jax.Array, *,
               model, tx: optax.GradientTransformation, schedule: optax.Schedule,
               objective: Objective, axis_name: Optional[str] = None
               ) -> Tuple[TrainState, Metrics]:
  """One optimizer update of `objective`.

  Args:
    state: TrainState.
    batch: the task's training batch (dict of arrays, leading axis B).
    rng: PRNG key shared by all steps; folded with the step (and the device
      under pmap) for dropout and samplers.
    model, tx, schedule, objective: static pieces (bound by
      parallel.Parallel.compile).
    axis_name: pmap axis name, or None under jit.

  Returns:
    (new state, metrics: apply_gradients' loss, grad_norm, learning_rate,
    finite, plus the objective's parts).
  """
  key = jax.random.fold_in(rng, state.step)
  if axis_name:  # Different dropout masks and samples on each device, as under jit.
    key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))

  def loss_of(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    loss, parts, batch_stats = objective(model, variables, batch, key, axis_name)
    return loss, (parts, batch_stats)

  grads, (parts, batch_stats) = jax.grad(loss_of, has_aux=True)(state.params)
  if axis_name:
    grads, parts = jax.lax.psum((grads, parts), axis_name)
  parts = dict(parts)
  new_state, step_metrics = apply_gradients(state, grads, parts.pop("loss"), batch_stats,
                                            tx=tx, schedule=schedule)
  return new_state, {**step_metrics, **parts}


def apply_gradients(state: TrainState, grads, loss: jax.Array, batch_stats, *,
                    tx: optax.GradientTransformation, schedule: optax.Schedule
                    ) -> Tuple[TrainState, Metrics]:
  """The optimizer update of `grads`, applied only if everything is finite.

  Args:
    state: TrainState before the step.
    grads: gradients of `loss` w.r.t. state.params (already reduced over
      devices under pmap).
    loss: float32 scalar, the step's loss.
    batch_stats: the BatchNorm statistics after the step.

  Returns:
    (new state, metrics dict of float32 scalars: loss, grad_norm,
    learning_rate, finite).
  """
  grad_norm = optax.global_norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  # A NaN/Inf step changes nothing but the counters; the loop reads the
  # counter at its logging cadence, so there is no host sync per step. An
  # update that overflows the parameters counts too: saving it would turn a
  # good checkpoint bad. One lax.cond picks the new or the old state: with a
  # jnp.where per leaf, XLA copied the chain of per-leaf checks into every
  # leaf's select (leaves x leaves scalar ops), which made compiling the
  # step 2.5x slower (SegFormer-B0 tiny: 15 s -> 6 s) and the step itself
  # slower (README, "The step's own overheads").
  params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p))
                                     for p in jax.tree_util.tree_leaves(params)]))
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & params_finite
  params, batch_stats, opt_state = jax.lax.cond(
      finite, lambda: (params, batch_stats, opt_state),
      lambda: (state.params, state.batch_stats, state.opt_state))
  new_state = state.replace(
      step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
      nonfinite=state.nonfinite + (~finite).astype(jnp.int32))
  step_metrics = dict(loss=loss, grad_norm=grad_norm,
                      learning_rate=jnp.asarray(schedule(state.step), jnp.float32),
                      finite=finite.astype(jnp.float32))
  return new_state, step_metrics
