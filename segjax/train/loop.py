"""The training loop: data, compiled steps, logging, checkpoints, evaluation.

`train(config, workdir)` resumes from the newest readable checkpoint in
<workdir>/checkpoints, trains to `train.steps`, saves every
`checkpoint.every_steps`, at the end, and when preempted (SIGTERM), and
evaluates every `eval.every_steps` and at the end. At a step due for both,
the checkpoint is written first: an evaluation that fails never costs one.
Metrics are fetched from the devices only every `train.log_every_steps`, so
steps are dispatched without a host sync in between.

What differs between kinds of model (loss, data, evaluation) comes from the
config's task (segjax/tasks); nothing here depends on the kind.
"""
import functools
import os
import signal
import threading
import time
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import jax
import numpy as np

from segjax import config as config_lib
from segjax import models, tasks
from segjax.errors import ConfigError, TrainingError
from segjax.models import crf_option
from segjax.models.remat import KEEP_REMAT
from segjax.train import checkpoint as ckpt_lib
from segjax.train import optim, parallel, steps
from segjax.train.logger import MetricsWriter, Progress
from segjax.train.state import TrainState, init_state


def build_model(config, axis_name: Optional[str] = None):
  """The config's model, with compute dtype and (pmap) BatchNorm axis name."""
  import jax.numpy as jnp
  kwargs = dict(config.model_kwargs)
  kwargs.update(crf_option.normalisation_options(config.model, config))
  kwargs["dtype"] = getattr(jnp, config.dtype)
  if axis_name:
    kwargs["bn_axis_name"] = axis_name
  return models.build(config.model, num_classes=config.num_classes, **kwargs)


class Trainer:
  """Holds the compiled step, the task and the state of one run (also used
  by `segjax eval` and `segjax predict`).

  Use it as a context manager (or call `close`): orbax's checkpoint manager
  runs background threads, which must finish before the process exits.
  """

  def __init__(self, config, workdir: str, devices: Optional[Sequence[jax.Device]] = None):
    self.config = config
    self.workdir = workdir
    self.par = parallel.Parallel(config.parallel.mode, parallel.make_mesh(devices))
    self.primary = jax.process_index() == 0
    self.model = build_model(config, self.par.axis_name)
    self.task = tasks.for_config(config, self.model, self.par)
    tx, self.schedule = optim.make_optimizer(config.optimizer, config.train.steps)
    self.tx = self.task.wrap_optimizer(tx)
    self.checkpoints = ckpt_lib.Checkpoints(
        os.path.join(workdir, "checkpoints"), config.checkpoint.every_steps,
        config.checkpoint.keep)
    self.rng = jax.random.PRNGKey(config.seed)
    self._train_fn = None

  def __enter__(self) -> "Trainer":
    return self

  def __exit__(self, *exc_info):
    self.close()

  def close(self) -> None:
    """Waits for a background checkpoint write, then stops orbax's threads."""
    self.checkpoints.close()

  # --- state ---------------------------------------------------------------
  def initial_state(self, step: Optional[int] = None, set_aside: bool = False
                    ) -> Tuple[TrainState, int]:
    """The newest checkpoint if any, else a fresh state (or `init_from` weights).

    A checkpoint is restored straight into the abstract state (shapes and
    target shardings from `jax.eval_shape`), so start-up holds one state, not
    a fresh one beside the restored one.

    Args:
      step: restore exactly this checkpoint step instead of the newest.
      set_aside: move unreadable checkpoints out of the way (training).

    Returns:
      (device state, step it starts from).
    """
    init = functools.partial(init_state, self.model, self.tx,
                             image_shape=self.task.init_shape)
    key = jax.random.fold_in(self.rng, 1)
    if step is not None or self.checkpoints.all_steps():
      # pmap restores onto one local device, then replicates.
      sharding = (self.par.replicated if self.par.mode == "jit"
                  else jax.sharding.SingleDeviceSharding(self.par.local_devices[0]))
      target = jax.tree_util.tree_map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
          jax.eval_shape(init, key))
      restored, step = self.checkpoints.restore(target.to_dict(), step=step,
                                                  set_aside=set_aside)
      state = TrainState(**restored)
      if self.par.mode == "pmap":
        state = self.par.put_state(jax.device_get(state))
      return state, int(step)
    if self.config.init_from:
      host = ckpt_lib.load_init(self.config.init_from, jax.device_get(jax.jit(init)(key)))
      return self.par.put_state(host), 0
    if self.par.mode == "jit":
      return jax.jit(init, out_shardings=self.par.replicated)(key), 0
    return self.par.put_state(jax.device_get(jax.jit(init)(key))), 0

  def save(self, state: TrainState, force: bool = False) -> bool:
    step = int(self.par.fetch(state.step))
    return self.checkpoints.save(step, self.par.host_state(state).to_dict(), force=force)

  # --- compiled step and data ----------------------------------------------
  @property
  def train_fn(self) -> Callable:
    """The compiled step: (state, device batch, rng) -> (state, metrics)."""
    if self._train_fn is None:
      # XLA:CPU would otherwise merge remat's recomputation back into the
      # forward pass and save nothing (segjax/models/remat.py).
      options = KEEP_REMAT if self.config.model_kwargs.get("remat") else None
      self._train_fn = self.par.compile(
          steps.train_step, donate_first=True, compiler_options=options,
          model=self.model, tx=self.tx, schedule=self.schedule,
          objective=self.task.objective())
    return self._train_fn

  def train_batches(self, start_step: int) -> Iterator[Dict[str, np.ndarray]]:
    """Host batches of the training steps from `start_step`, as the step reads them."""
    return self.task.train_batches(start_step)

  def evaluate(self, state: TrainState, split: Optional[str] = None,
               progress: Optional[Callable] = None) -> Dict:
    """The task's scores of `split` (default eval.split) for a device state:
    the config's eval protocol on every device of every host."""
    return self.task.evaluate(state, split or self.config.eval.split, progress)

  def variables(self, state: TrainState) -> Dict:
    """{"params", "batch_stats"} of a device state, on the host."""
    host = jax.device_get(self.par.host_state(state))
    return {"params": host.params, "batch_stats": host.batch_stats}


def train(config, workdir: str) -> Optional[Dict]:
  """Runs (or resumes) training; returns the final evaluation scores.

  Raises:
    TrainingError: the loss or gradient became non-finite (policy "stop", or
      more than `train.max_nonfinite_steps` skipped steps under "skip").
  """
  os.makedirs(workdir, exist_ok=True)
  devices = jax.device_count()
  if config.train.batch_size % devices:
    raise ConfigError(f"train.batch_size={config.train.batch_size} is not a multiple "
                      f"of the {devices} devices; change --config.train.batch_size")
  with Trainer(config, workdir) as trainer:
    return _train(trainer, config, workdir)


def _train(trainer, config, workdir):
  progress = Progress(config.train.steps, trainer.primary)
  if trainer.primary:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_lib.to_json(config))
  writer = MetricsWriter(workdir, trainer.primary)
  preempted = _PreemptionFlag(single_process=jax.process_count() == 1)
  total = config.train.steps
  try:
    state, start = trainer.initial_state(set_aside=True)
    # Rows of steps after the checkpoint were written by a run that was cut
    # short; the resumed run writes them again (as TensorBoard discards
    # events past a restart's step).
    writer.rewind(start)
    if start >= total:
      progress.print(f"the checkpoint at step {start} already reaches train.steps="
                     f"{total}: nothing to train (raise --config.train.steps to "
                     "continue, or run segjax eval)")
      return None
    if start:
      progress.print(f"resuming from checkpoint at step {start}")
    rng = trainer.par.put_replicated(trainer.rng)
    batches = trainer.train_batches(start)
    pending, tick, last_log = [], time.time(), start
    for step in range(start, total):
      state, step_metrics = trainer.train_fn(state, trainer.par.put_batch(next(batches)), rng)
      pending.append(step_metrics)
      done = step + 1
      if done % config.train.log_every_steps == 0 or done == total:
        values = _summarise(trainer, state, pending)
        values["images_per_sec"] = (done - last_log) * config.train.batch_size / (
            time.time() - tick)
        pending, tick, last_log = [], time.time(), done
        writer.write(done, "train", values)
        progress.line(done, values)
      if done % config.checkpoint.every_steps == 0:
        _check_finite(trainer, state, config)
        trainer.save(state)
      if done % config.eval.every_steps == 0 and done != total:
        _evaluate(trainer, state, done, writer, progress)
      if preempted(trainer.checkpoints, done):
        _check_finite(trainer, state, config)
        trainer.save(state, force=True)
        trainer.checkpoints.wait()
        # Every host says so: on a pod each host's log shows the agreed step.
        print(f"preempted: saved checkpoint at step {done}; exiting"
              + (f" (process {jax.process_index()})" if jax.process_count() > 1 else ""),
              flush=True)
        return None
    _check_finite(trainer, state, config)
    trainer.save(state, force=True)
    result = _evaluate(trainer, state, total, writer, progress)
    progress.print(f"final {config.eval.split}: {trainer.task.summary_line(result)}")
    return result
  finally:
    writer.close()
    preempted.restore()


def _summarise(trainer, state, pending):
  """Means of the pending step metrics (one device->host transfer)."""
  fetched = trainer.par.fetch(pending)
  values = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
  values.pop("finite")
  values["nonfinite_steps"] = _check_finite(trainer, state, trainer.config)
  return values


def _check_finite(trainer, state, config):
  """Applies train.nan_policy to the count of NaN/Inf steps; returns the count.

  The step itself never applies a non-finite update (steps.train_step), so
  the state in hand is the last finite one and checkpoints stay good.
  """
  nonfinite = int(trainer.par.fetch(state.nonfinite))
  if not nonfinite:
    return 0
  policy = config_lib.option(config.train, "train", "nan_policy")
  limit = config_lib.option(config.train, "train", "max_nonfinite_steps")
  if policy == "skip" and nonfinite <= limit:
    return nonfinite
  last = trainer.checkpoints.latest_step()
  if policy == "skip":
    raise TrainingError(
        f"{nonfinite} steps had a NaN/Inf loss or gradient and were skipped, more "
        f"than train.max_nonfinite_steps={limit}; the last good checkpoint (step "
        f"{last}) is intact. Lower optimizer.learning_rate, enable "
        "optimizer.grad_clip_norm or check the data")
  raise TrainingError(
      f"the loss or gradient became NaN/Inf ({nonfinite} step(s) so far); the "
      f"last good checkpoint (step {last}) is intact. Lower "
      "optimizer.learning_rate, enable optimizer.grad_clip_norm, check the data, "
      "or set train.nan_policy='skip' to skip such steps")


def _evaluate(trainer, state, step, writer, progress):
  started = time.time()
  result = trainer.evaluate(state)
  writer.write(step, trainer.config.eval.split, result)
  progress.print(f"eval {trainer.config.eval.split} at step {step}: "
                 f"{trainer.task.summary_line(result)} | {time.time() - started:.1f}s")
  return result


class _PreemptionFlag:
  """SIGTERM -> save and stop at an agreed step.

  One process: our own handler sets a flag. Several: JAX's preemption sync
  manager catches SIGTERM and orbax's `reached_preemption` makes every host
  stop at the same step.
  """

  def __init__(self, single_process):
    self.single = single_process
    self.flag = threading.Event()
    self.previous = None
    if single_process and threading.current_thread() is threading.main_thread():
      self.previous = signal.signal(signal.SIGTERM, lambda *_: self.flag.set())

  def __call__(self, checkpoints, step):
    if self.single:
      return self.flag.is_set()
    return checkpoints.reached_preemption(step)

  def restore(self):
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)
