"""Recovery from corrupt checkpoints and non-finite training, through the CLI.

Each case checks the message, the exit status, and that every checkpoint
saved before is still restorable (and a corrupt one never silently deleted).
"""
import filecmp
import json
import logging
import os
import shutil

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import tiny_config, train_argv
from segjax import cli
from segjax.data import pipeline
from segjax.train import checkpoint, loop
from segjax.train.checkpoint import restore_on_host


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
  """Retried checkpoint reads wait milliseconds: a corrupt checkpoint is
  read READ_TRIES times before it is passed over."""
  monkeypatch.setattr(checkpoint, "READ_BACKOFF_S", 0.001)


@pytest.fixture(scope="module")
def trained(shapes_dir, tmp_path_factory):
  """A finished 4-step run with checkpoints at steps 2 and 4."""
  workdir = tmp_path_factory.mktemp("run")
  assert cli.main(train_argv(shapes_dir, workdir)) == 0
  return workdir


def _files(step_dir):
  return [os.path.join(root, name) for root, _, names in os.walk(step_dir)
          for name in names]


def _truncate(step_dir):
  for path in _files(step_dir):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def _empty(step_dir):
  for entry in os.listdir(step_dir):
    path = os.path.join(step_dir, entry)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _garbage(step_dir):
  rng = np.random.default_rng(0)
  for path in _files(step_dir):
    with open(path, "wb") as f:
      f.write(rng.integers(0, 256, 64, np.uint8).tobytes())


def _restorable(workdir, step):
  params = restore_on_host(os.path.join(workdir, "checkpoints", str(step)))["params"]
  return all(np.isfinite(v).all() for v in jax.tree_util.tree_leaves(params))


CORRUPTIONS = {"truncated": _truncate, "emptied": _empty, "garbage": _garbage}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_latest_checkpoint(corruption, trained, shapes_dir, tmp_path, caplog,
                                   capsys):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  bad = workdir / "checkpoints" / "4"
  CORRUPTIONS[corruption](bad)
  kept = tmp_path / "bad_copy"
  shutil.copytree(bad, kept)

  # Evaluation falls back to step 2 and leaves the bad checkpoint in place.
  with caplog.at_level(logging.WARNING):
    assert cli.main(["eval", "--workdir", str(workdir)]) == 0
  assert "at step 2:" in capsys.readouterr().out
  assert f"checkpoint {bad} is unreadable or corrupt" in caplog.text
  assert "left in place" in caplog.text and bad.is_dir()

  # Training falls back too, moves the bad checkpoint aside (bytes intact)
  # so that step 4 can be saved afresh, and carries on.
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert cli.main(train_argv(shapes_dir, workdir, "--config.train.steps=6")) == 0
  aside = workdir / "corrupt_checkpoints" / "4"
  assert f"moved to {aside}" in caplog.text
  assert "resuming from checkpoint at step 2" in capsys.readouterr().out
  comparison = filecmp.dircmp(kept, aside)
  assert not (comparison.left_only or comparison.right_only or comparison.diff_files)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]
  assert all(_restorable(workdir, step) for step in (2, 4, 6))


def test_every_checkpoint_corrupt_is_refused(trained, tmp_path, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  for step in ("2", "4"):
    _truncate(workdir / "checkpoints" / step)
  assert cli.main(["eval", "--workdir", str(workdir)]) == 2
  err = capsys.readouterr().err
  assert "none of the checkpoints [2, 4]" in err and "could be read" in err
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]


def test_transient_read_error_resumes_from_the_newest(trained, shapes_dir, tmp_path,
                                                       monkeypatch, caplog, capsys):
  """The first read of each step fails (a network file system's timeout), the
  next works: training resumes from the newest step and moves nothing."""
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  real_restore = ocp.CheckpointManager.restore
  reads = []

  def flaky_restore(self, step, *args, **kwargs):
    reads.append(step)
    if reads.count(step) == 1:
      raise OSError(f"injected: reading step {step} timed out")
    return real_restore(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "restore", flaky_restore)
  with caplog.at_level(logging.WARNING):
    assert cli.main(train_argv(shapes_dir, workdir, "--config.train.steps=6")) == 0
  assert "resuming from checkpoint at step 4" in capsys.readouterr().out
  assert reads == [4, 4]  # failed once, read on the retry
  assert "injected: reading step 4 timed out" in caplog.text
  assert "reading it again" in caplog.text
  assert not (workdir / "corrupt_checkpoints").exists()
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]
  assert all(_restorable(workdir, step) for step in (2, 4, 6))


def test_no_checkpoint_readable_moves_nothing(trained, shapes_dir, tmp_path,
                                              monkeypatch, capsys):
  """Every read fails every time (the storage, not the files, is at fault):
  exit 2, each checkpoint where it was, and the message says so."""
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  reads = []

  def failing_restore(self, step, *args, **kwargs):
    reads.append(step)
    raise OSError("injected: permission denied")

  monkeypatch.setattr(ocp.CheckpointManager, "restore", failing_restore)
  assert cli.main(train_argv(shapes_dir, workdir, "--config.train.steps=6")) == 2
  err = capsys.readouterr().err
  assert "none of the checkpoints [2, 4]" in err and "could be read" in err
  assert "Nothing was moved" in err and "injected: permission denied" in err
  assert reads == [4] * checkpoint.READ_TRIES + [2] * checkpoint.READ_TRIES
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  assert not (workdir / "corrupt_checkpoints").exists()
  assert all(_restorable(workdir, step) for step in (2, 4))


@pytest.mark.parametrize("override,named", [
    ("--config.num_classes=5", "has shape"),
    ("--config.model_kwargs.base_width=8", "has shape"),
    ("--config.model_kwargs.depth=3", "missing from the checkpoint")])
def test_checkpoint_of_another_model_is_refused(trained, shapes_dir, tmp_path,
                                                override, named, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  assert cli.main(train_argv(shapes_dir, workdir, "--config.train.steps=6", override)) == 2
  err = capsys.readouterr().err
  assert "does not fit this model" in err and named in err
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  assert not (workdir / "corrupt_checkpoints").exists()  # a mismatch is not corruption
  assert all(_restorable(workdir, step) for step in (2, 4))


def test_nonfinite_step_is_skipped_and_counted(shapes_dir, tmp_path):
  """A NaN batch leaves params, statistics and optimizer state bit for bit as
  they were and counts the step; the next finite batch trains normally."""
  config = tiny_config(shapes_dir, "train.nan_policy=skip")
  with loop.Trainer(config, str(tmp_path)) as trainer:
    state, _ = trainer.initial_state()
    batch = next(pipeline.train_batches(config))
    poisoned = dict(batch, image=np.where(np.arange(batch["image"].shape[1])[:, None, None]
                                          == 3, np.nan, batch["image"]).astype(np.float32))
    rng = trainer.par.put_replicated(trainer.rng)
    before = jax.device_get(state)
    state, step_metrics = trainer.train_fn(state, trainer.par.put_batch(poisoned), rng)
    after = jax.device_get(state)
    assert float(step_metrics["finite"]) == 0.0
    assert int(after.nonfinite) == 1 and int(after.step) == int(before.step) + 1
    for name in ("params", "batch_stats", "opt_state"):
      # Structure and values: a state that lost leaves fails too.
      chex.assert_trees_all_equal(getattr(after, name), getattr(before, name))
    state, step_metrics = trainer.train_fn(state, trainer.par.put_batch(batch), rng)
    trained = jax.device_get(state)
    assert float(step_metrics["finite"]) == 1.0 and int(trained.nonfinite) == 1
    chex.assert_trees_all_equal_structs(trained.params, after.params)
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree_util.tree_leaves(after.params), jax.tree_util.tree_leaves(trained.params)))


def test_skip_policy_stops_past_its_limit(trained, shapes_dir, tmp_path, capsys):
  # The finished run saved steps 2 and 4. Continuing with an absurd learning
  # rate makes every later step non-finite: they are skipped and counted in
  # the train rows until the count passes the limit, then the run stops.
  shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
  assert cli.main(train_argv(shapes_dir, tmp_path, "--config.train.steps=40",
                         "--config.optimizer.learning_rate=1e30",
                         "--config.train.nan_policy=skip",
                         "--config.train.max_nonfinite_steps=3")) == 2
  err = capsys.readouterr().err
  assert "were skipped, more than train.max_nonfinite_steps=3" in err
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  rows = [r for r in rows if r["split"] == "train"]
  assert any(r["nonfinite_steps"] > 0 for r in rows)
  steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
  assert 4 in steps and all(_restorable(tmp_path, s) for s in steps)


def test_unknown_nan_policy_is_a_config_error(shapes_dir, tmp_path, capsys):
  assert cli.main(train_argv(shapes_dir, tmp_path, "--config.train.nan_policy=ignore")) == 2
  assert "train.nan_policy is 'ignore'; use 'stop' or 'skip'" in capsys.readouterr().err
