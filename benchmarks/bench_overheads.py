"""What segjax's own machinery costs per train step, as a share of the step.

    python benchmarks/bench_overheads.py [--models unet,deeplab_v3,mask_rcnn_r50_fpn] [--json out.json]

`segjax train` runs `steps.train_step` under jit and, on the host, keeps
each step's metrics (device scalars, not fetched) until the next log line.
Beyond the gradient and the optimizer update, the step folds the step
number into the PRNG key and guards against NaN/Inf (checks the loss, the
gradient norm and every updated parameter, and keeps the old state where
anything is not finite). Each variant below is compiled and timed in the
same process, interleaved round by round, the state donated as in training:

  plain   grad, tx.update, apply_updates: an SGD closure, fixed key
  +fold   plain with the key folded with the step, as train_step does
  segjax  steps.train_step itself (fold, guard, metrics), with the loop's
          per-step metric bookkeeping (a list of the step's outputs)

A share is (variant - plain) / segjax's step. Each round times `--steps`
steps back to back, blocking only at the end, as the loop does between log
lines; the figure is the median over rounds of seconds per step.
"""
import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bench_models
import timing
from segjax import losses, models
from segjax.models.detection import mask_rcnn
from segjax.tasks import instance, semantic
from segjax.train import optim, steps
from segjax.train.state import init_state

# (model options, (H, W), batch) per model: sizes a CPU times in seconds.
DEFAULTS = {
    "unet": (dict(base_width=32, depth=4, padding="same"), (256, 256), 4),
    "deeplab_v3": (dict(stage_sizes=(3, 4, 6, 3)), (257, 257), 2),
    "mask_rcnn_r50_fpn": ({}, (512, 512), 1),
}
SMOKE = {
    "unet": (dict(base_width=4, depth=2, padding="same"), (32, 32), 2),
    "deeplab_v3": (dict(stage_sizes=(1, 1, 1, 3), width=8, aspp_channels=16), (33, 33), 2),
    "mask_rcnn_r50_fpn": (dict(mask_rcnn.TINY), (64, 64), 1),
}


def _plain_step(state, batch, key, *, model, tx, objective, fold):
  """grad + update + apply, nothing else (the state's other fields kept)."""
  if fold:
    key = jax.random.fold_in(key, state.step)

  def loss_of(params):
    loss, _, batch_stats = objective(model, {"params": params,
                                             "batch_stats": state.batch_stats}, batch, key)
    return loss, batch_stats
  (loss, batch_stats), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       opt_state=opt_state, batch_stats=batch_stats), {"loss": loss}


def _setup(name, options, size, n, seed=0):
  """(model, tx, schedule, objective, state, batch) for one row."""
  model = models.build(name, 21 if models.task(name) == "semantic" else 91, **options)
  tx, schedule = optim.make_optimizer(bench_models._sgd(), 1000)
  rng = np.random.default_rng(seed)
  if models.task(name) == "instance":
    tx = optim.freeze(tx, functools.partial(mask_rcnn.trainable_mask, model))
    objective = instance.objective
    batch = bench_models.synthetic_instances(n, size, size, 91, 7, seed)
  else:
    objective = semantic.make_objective(losses.make_loss("cross_entropy"))
    batch = {"image": rng.normal(size=(n, *size, 3)).astype(np.float32),
             "label": rng.integers(0, 21, (n, *size)).astype(np.int32)}
  state = jax.jit(init_state, static_argnums=(0, 1, 3))(model, tx, jax.random.PRNGKey(0),
                                                          (*size, 3))
  return model, tx, schedule, objective, state, {k: jnp.asarray(v) for k, v in batch.items()}


def bench(name, options, size, n, steps_per_round, rounds):
  model, tx, schedule, objective, state, batch = _setup(name, options, size, n)
  variants = {
      "plain": functools.partial(_plain_step, model=model, tx=tx, objective=objective,
                                 fold=False),
      "+fold": functools.partial(_plain_step, model=model, tx=tx, objective=objective,
                                 fold=True),
      "segjax": functools.partial(steps.train_step, model=model, tx=tx, schedule=schedule,
                                  objective=objective),
  }
  key = jax.random.PRNGKey(1)
  compiled, states = {}, {}
  for label, fn in variants.items():
    compiled[label] = jax.jit(fn, donate_argnums=0).lower(state, batch, key).compile()
    states[label] = jax.tree_util.tree_map(jnp.copy, state)
  times = {label: [] for label in variants}

  def run(label):
    pending, s = [], states[label]
    start = time.perf_counter()
    for _ in range(steps_per_round):
      s, metrics = compiled[label](s, batch, key)
      if label == "segjax":
        pending.append(metrics)  # the loop's bookkeeping between log lines
    jax.block_until_ready(s)
    states[label] = s
    return (time.perf_counter() - start) / steps_per_round

  for label in variants:  # warm-up round
    run(label)
  for _ in range(rounds):
    for label in variants:
      times[label].append(run(label))
  step = {label: statistics.median(t) for label, t in times.items()}
  return {"model": name, "input": f"{size[0]}x{size[1]}", "batch": n,
          "plain_s": step["plain"], "fold_s": step["+fold"], "segjax_s": step["segjax"],
          "fold_share": (step["+fold"] - step["plain"]) / step["segjax"],
          "overhead_share": (step["segjax"] - step["plain"]) / step["segjax"]}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default=",".join(DEFAULTS))
  parser.add_argument("--steps", type=int, default=3, help="steps per round")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--smoke", action="store_true", help="toy sizes (the test suite)")
  parser.add_argument("--json", help="write the rows here")
  args = parser.parse_args(argv)
  table = SMOKE if args.smoke else DEFAULTS
  rows = []
  print(f"{'model':>18} {'input':>9} {'batch':>5} {'plain s':>8} {'+fold s':>8} "
        f"{'segjax s':>8} {'overhead':>8}")
  for name in args.models.split(","):
    options, size, n = table[name]
    row = bench(name, options, size, n, args.steps, args.rounds)
    rows.append(row)
    print(f"{name:>18} {row['input']:>9} {n:>5} {row['plain_s']:>8.4g} {row['fold_s']:>8.4g} "
          f"{row['segjax_s']:>8.4g} {row['overhead_share']:>8.1%}", flush=True)
  timing.write_rows(args.json, args, rows)
  return rows


if __name__ == "__main__":
  main()
