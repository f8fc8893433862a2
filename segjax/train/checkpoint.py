"""Checkpoints: an orbax CheckpointManager in <workdir>/checkpoints.

Each checkpoint is `<workdir>/checkpoints/<step>/` with one item, `state`
(the TrainState as a dict pytree). Orbax writes a step into a temporary
directory and renames it when complete, so a run killed mid-write leaves the
previous checkpoints untouched; `keep` old steps are deleted only after a
newer one is finalised. Restoring walks back from the newest step past any
checkpoint that cannot be read, naming it, and never deletes it. Each read is
tried a few times first, so that a passing I/O error (a network file system's
timeout) is not taken for corruption. A checkpoint counts as bad only once an
older one has then been read: training moves it to
<workdir>/corrupt_checkpoints/ (so the step can be written afresh),
evaluation leaves it where it is. When none can be read, nothing moves: the
fault may lie in the storage rather than in the files.
"""
import logging
import os
import shutil
import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from segjax.errors import CheckpointError
from segjax.train.state import TrainState

ITEM = "state"

# A read that raises is tried this many times in all, waiting READ_BACKOFF_S
# before the second try and twice as long before each later one: enough to
# ride out a network file system's hiccup, short next to a training run.
READ_TRIES = 3
READ_BACKOFF_S = 1.0


class Checkpoints:
  """Saves and restores the train state of one workdir.

  Args:
    directory: the checkpoints directory (created if missing).
    every_steps: periodic save cadence; `save(..., force=True)` saves anyway.
    keep: number of most recent checkpoints kept.
    async_save: write in a background thread while training goes on.
  """

  def __init__(self, directory: str, every_steps: int = 1000, keep: int = 3,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every_steps, max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save,
        # Temporary dirs of writes cut short by a kill are removed at start.
        cleanup_tmp_directories=True)
    try:
      # The handler named up front lets item_metadata read a step before
      # anything was saved or restored (the shape check before a restore).
      self.manager = ocp.CheckpointManager(
          self.directory, options=options,
          item_handlers={ITEM: ocp.StandardCheckpointHandler()})
    except (OSError, ValueError) as e:
      raise CheckpointError(f"cannot open checkpoint directory {self.directory}: "
                            f"{e}; check the --workdir path and its permissions") from e

  def all_steps(self) -> List[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, tree: Any, force: bool = False) -> bool:
    """Starts saving `tree` at `step` if due (or forced); returns whether it did."""
    if step in self.manager.all_steps():
      return False
    return self.manager.save(step, args=ocp.args.Composite(
        **{ITEM: ocp.args.StandardSave(tree)}), force=force)

  def restore(self, target: Any, step: Optional[int] = None, set_aside: bool = False
              ) -> Tuple[Optional[Any], Optional[int]]:
    """Restores the newest readable checkpoint (or exactly `step`).

    Args:
      target: pytree of arrays or jax.ShapeDtypeStruct giving the structure,
        shapes, dtypes and shardings to restore into.
      step: a specific step, or None for the newest one that can be read.
      set_aside: once an older checkpoint has been read, move each newer
        one that could not be to <workdir>/corrupt_checkpoints/ (training
        does, so that it can save that step again); otherwise, or when none
        can be read, every checkpoint stays in place.

    Returns:
      (restored tree, step), or (None, None) when there is no checkpoint.
    """
    steps = self.all_steps()
    if step is not None:
      if step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                              f"available steps: {steps or 'none'}")
      return self._read(target, step), step
    # Unreadable steps are only set aside once an older one has been read:
    # that proves the storage works and these files are bad. Were none
    # readable, the storage itself may be failing, and moving every
    # checkpoint would make the next launch start from step 0.
    unreadable = []
    for candidate in reversed(steps):
      try:
        restored = self._read(target, candidate)
      except CheckpointError as e:
        if _is_mismatch(e):
          raise
        logging.warning("%s; trying the previous checkpoint", e)
        unreadable.append((candidate, e))
        continue
      for bad, error in unreadable:
        where = self._set_aside(bad) if set_aside else "left in place"
        logging.warning("checkpoint step %d could not be read (%s) while step %d "
                        "could: it is %s for inspection", bad, error, candidate,
                        where)
      return restored, candidate
    if steps:
      errors = "; ".join(f"step {s}: {e}" for s, e in unreadable)
      raise CheckpointError(
          f"none of the checkpoints {steps} in {self.directory} could be read, "
          f"each tried {max(1, READ_TRIES)} times ({errors}). Nothing was moved: a "
          "storage fault (network file system, permissions, memory) may be "
          "to blame, so retry once it is fixed; if the files themselves are "
          "bad, move the directory away to start afresh, or point --workdir "
          "elsewhere")
    return None, None

  def _read(self, target, step):
    """`_restore_step`, tried up to READ_TRIES times with a doubling backoff.

    A mismatch (another model's checkpoint) is raised at once: reading again
    cannot change it.
    """
    tries, delay = max(1, READ_TRIES), READ_BACKOFF_S
    for attempt in range(1, tries + 1):
      try:
        return self._restore_step(target, step)
      except CheckpointError as e:
        if _is_mismatch(e) or attempt >= tries:
          raise
        logging.warning("%s; reading it again in %.3g s (try %d of %d)", e, delay,
                        attempt + 1, tries)
      time.sleep(delay)
      delay *= 2

  def _restore_step(self, target, step):
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    path = os.path.join(self.directory, str(step))
    # Shapes are compared from the metadata first: a restore that fails on a
    # shape part-way leaves orbax's pending reads to die in the garbage
    # collector, after their event loop has closed.
    mismatch = _describe_mismatch(self.manager, step, abstract)
    if mismatch:
      raise CheckpointError(
          f"checkpoint {path} does not fit this model: {mismatch}. It was "
          "written by a different model or num_classes; use another --workdir "
          "or the config it was trained with")
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          **{ITEM: ocp.args.StandardRestore(abstract)}))
    except Exception as e:  # orbax/tensorstore raise many types on bad files.
      if "tree structures do not match" in str(e):
        raise CheckpointError(
            f"checkpoint {path} does not fit this model: the parameters match but "
            "the optimizer state is structured differently, so optimizer settings "
            "(name, gradient clipping) changed since it was saved; resume with "
            "the original config or use another --workdir") from e
      raise CheckpointError(f"checkpoint {path} is unreadable or corrupt "
                            f"({type(e).__name__}: {str(e)[:200]})") from e
    return restored[ITEM]

  def _set_aside(self, step):
    """Moves checkpoint `step` out of the managed directory; says where to.

    Every process reads the same shared directory: process 0 moves, the
    others wait for it, then all re-list their steps so that they agree on
    which steps exist (saving is collective).
    """
    source = os.path.join(self.directory, str(step))
    target = base = os.path.join(os.path.dirname(self.directory),
                                 "corrupt_checkpoints", str(step))
    suffix = 1
    while os.path.exists(target):  # Keep an earlier bad copy of this step too.
      suffix += 1
      target = f"{base}.{suffix}"
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(source, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"segjax set aside checkpoint {step}")
    self.manager.reload()
    return f"moved to {target}"

  def reached_preemption(self, step: int) -> bool:
    """True on every host once a preemption notice has been agreed at `step`."""
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    """Blocks until the background save (if any) is finished."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for a background save, then stops orbax's threads (call once
    done: an unclosed manager's threads outlive the event loop they use)."""
    self.manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()


def _is_mismatch(error):
  return "does not fit this model" in str(error)


def _describe_mismatch(manager, step, abstract):
  """Names parameters whose saved shape differs from the target's, if any."""
  try:
    meta = manager.item_metadata(step)[ITEM]
  except Exception:  # Metadata itself unreadable: a corrupt checkpoint.
    return ""
  if meta is None:
    return ""
  # Parameters and statistics say which model wrote a checkpoint; optimizer
  # state follows from them (and its metadata tree is stored differently).
  saved = _flat_shapes({k: meta[k] for k in ("params", "batch_stats") if k in meta})
  wanted = _flat_shapes({k: abstract[k] for k in ("params", "batch_stats")})
  problems = []
  for name in sorted(set(saved) | set(wanted)):
    if name not in saved:
      problems.append(f"{name} missing from the checkpoint")
    elif name not in wanted:
      problems.append(f"{name} not in the model")
    elif saved[name] != wanted[name]:
      problems.append(f"{name} has shape {saved[name]} in the checkpoint, "
                      f"{wanted[name]} in the model")
  if len(problems) > 8:
    problems = problems[:8] + [f"and {len(problems) - 8} more"]
  return "; ".join(problems)


def _flat_shapes(tree):
  flat = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {jax.tree_util.keystr(path): tuple(getattr(leaf, "shape", ()))
          for path, leaf in flat}


def load_init(path: str, state: TrainState) -> TrainState:
  """Starts `state` from the weights in `path` (config.init_from).

  `path` is a segjax workdir, its checkpoints directory, or one step
  directory (e.g. written by `segjax convert`). Parameters and BatchNorm
  statistics present in both are taken from the checkpoint (shapes must
  agree); those only in the model (a new head) keep their initial values.
  The optimizer state and step start afresh.
  """
  step_dir = _find_step_dir(path)
  try:
    restored = restore_on_host(step_dir)
  except Exception as e:
    raise CheckpointError(f"init_from checkpoint {step_dir} is unreadable "
                          f"({type(e).__name__}: {str(e)[:200]}); check the path "
                          "or re-create it with `segjax convert`") from e
  new = {}
  for key in ("params", "batch_stats"):
    new[key] = _overlay(getattr(state, key), restored.get(key, {}), key, step_dir)
  return state.replace(**new)


def restore_on_host(step_dir: str) -> Dict[str, Any]:
  """The `state` item of one step directory as numpy arrays.

  Works whatever the number of devices and hosts that wrote it (restoring
  without a target would insist on the writer's topology).
  """
  path = os.path.join(step_dir, ITEM)
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.metadata(path).item_metadata
    target = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), tree)
    return checkpointer.restore(path, target)


def _find_step_dir(path):
  path = os.path.abspath(os.path.expanduser(str(path)))
  if os.path.isdir(os.path.join(path, ITEM)):
    return path
  for root in (os.path.join(path, "checkpoints"), path):
    if os.path.isdir(root):
      steps = sorted(int(d) for d in os.listdir(root) if d.isdigit())
      if steps:
        return os.path.join(root, str(steps[-1]))
  raise CheckpointError(f"init_from={path!r} holds no checkpoint; give a workdir, "
                        "its checkpoints/ directory or one checkpoint step directory")


def _overlay(initial, loaded, name, where):
  """`initial` with every leaf that `loaded` also has replaced by its value."""
  keyed = lambda tree: [(jax.tree_util.keystr(p), v)
                        for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]]
  init_items = keyed(initial)
  loaded_items = dict(keyed(loaded))
  bad = [f"{k}: checkpoint {tuple(loaded_items[k].shape)} vs model {tuple(v.shape)}"
         for k, v in init_items
         if k in loaded_items and tuple(loaded_items[k].shape) != tuple(v.shape)]
  if bad:
    raise CheckpointError(f"init_from {where}: {name} shapes differ: " + "; ".join(bad[:8]))
  unused = set(loaded_items) - {k for k, _ in init_items}
  if unused:
    raise CheckpointError(f"init_from {where}: {name} in the checkpoint that the "
                          f"model lacks: {', '.join(sorted(unused)[:8])}")
  leaves = [np.asarray(loaded_items.get(k, v)).astype(v.dtype) for k, v in init_items]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(initial), leaves)
