"""Checkpoints: save/restore round trip, keep-N, read retries, init_from and
its refusals."""
import types

import chex
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from segjax import models
from segjax.errors import CheckpointError
from segjax.train import checkpoint, optim
from segjax.train.state import TrainState, init_state


def _state(num_classes=3, seed=0):
  model = models.build("unet", num_classes, depth=2, base_width=4)
  opt = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=1e-3, schedule="constant", warmup_steps=0,
      weight_decay=0.0, momentum=0.9, grad_clip_norm=0.0))
  tx, _ = optim.make_optimizer(opt, 10)
  return jax.device_get(init_state(model, tx, jax.random.PRNGKey(seed), (16, 16, 3)))


def _equal(a, b):
  # chex compares the tree structure too, so a leaf the restore dropped fails.
  chex.assert_trees_all_equal(a, b)


def test_round_trip_and_keep(tmp_path):
  states = {step: _state(seed=step) for step in (1, 2, 3)}
  with checkpoint.Checkpoints(tmp_path / "checkpoints", every_steps=1, keep=2) as manager:
    for step, state in states.items():
      assert manager.save(step, state.replace(step=np.int32(step)).to_dict())
      manager.wait()
    assert manager.all_steps() == [2, 3]  # keep=2 dropped the oldest
    restored, step = manager.restore(_state(seed=9).to_dict())
    assert step == 3
    _equal(TrainState(**restored).params, states[3].params)
    restored, step = manager.restore(_state(seed=9).to_dict(), step=2)
    _equal(TrainState(**restored).params, states[2].params)
    with pytest.raises(CheckpointError, match="no checkpoint for step 7"):
      manager.restore(_state().to_dict(), step=7)


def test_read_retries_are_bounded_and_skip_mismatches(tmp_path, monkeypatch):
  """Each read is tried READ_TRIES times, waiting the doubling backoff; when
  none works nothing is set aside. Another model's checkpoint is refused
  without a single read or wait."""
  sleeps = []
  # Only checkpoint.py's clock is replaced: orbax's threads keep the real one.
  monkeypatch.setattr(checkpoint, "time", types.SimpleNamespace(sleep=sleeps.append))
  monkeypatch.setattr(checkpoint, "READ_TRIES", 3)
  monkeypatch.setattr(checkpoint, "READ_BACKOFF_S", 0.5)
  with checkpoint.Checkpoints(tmp_path / "checkpoints", every_steps=1) as manager:
    for step in (1, 2):
      manager.save(step, _state(seed=step).to_dict())
      manager.wait()
    real_restore = ocp.CheckpointManager.restore
    reads = []

    def failing_restore(self, step, *args, **kwargs):
      reads.append(step)
      raise OSError("injected: I/O error")

    monkeypatch.setattr(ocp.CheckpointManager, "restore", failing_restore)
    with pytest.raises(CheckpointError, match="Nothing was moved"):
      manager.restore(_state().to_dict(), set_aside=True)
    assert reads == [2, 2, 2, 1, 1, 1] and sleeps == [0.5, 1.0, 0.5, 1.0]
    assert manager.all_steps() == [1, 2]
    assert not (tmp_path / "corrupt_checkpoints").exists()

    reads.clear()
    sleeps.clear()
    with pytest.raises(CheckpointError, match="does not fit this model"):
      manager.restore(_state(num_classes=5).to_dict(), set_aside=True)
    assert reads == [] and sleeps == []

    # An explicit step is retried too.
    def flaky_restore(self, step, *args, **kwargs):
      reads.append(step)
      if len(reads) == 1:
        raise OSError("injected: I/O error")
      return real_restore(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", flaky_restore)
    restored, step = manager.restore(_state(seed=9).to_dict(), step=1)
    assert step == 1 and reads == [1, 1] and sleeps == [0.5]
    _equal(TrainState(**restored).params, _state(seed=1).params)


def test_init_from_takes_matching_weights(tmp_path):
  source = _state(seed=1)
  with checkpoint.Checkpoints(tmp_path / "checkpoints") as manager:
    manager.save(5, source.to_dict(), force=True)
  fresh = _state(seed=2)
  loaded = checkpoint.load_init(tmp_path, fresh)  # a workdir works
  _equal(loaded.params, source.params)
  _equal(loaded.batch_stats, source.batch_stats)
  _equal(loaded.opt_state, fresh.opt_state)  # the optimizer starts afresh
  loaded = checkpoint.load_init(tmp_path / "checkpoints" / "5", fresh)
  _equal(loaded.params, source.params)


def test_init_from_refuses_other_shapes_and_missing_paths(tmp_path):
  with checkpoint.Checkpoints(tmp_path / "checkpoints") as manager:
    manager.save(1, _state(num_classes=3).to_dict(), force=True)
  with pytest.raises(CheckpointError, match=r"shapes differ: .*head.*kernel"):
    checkpoint.load_init(tmp_path, _state(num_classes=5))
  with pytest.raises(CheckpointError, match="holds no checkpoint"):
    checkpoint.load_init(tmp_path / "nowhere", _state())
