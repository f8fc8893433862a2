"""Runs in subprocesses: kill and resume, SIGTERM, and 2 hosts x 2 devices.

Each case compares final parameters read back from the checkpoints with a
reference run's.
"""
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import REPO, SMALL_DATASET, xla_flags
from segjax.train.checkpoint import restore_on_host

pytestmark = pytest.mark.slow(seconds=280)
CONFIG = os.path.join(REPO, "configs", "unet_shapes.py:tiny")


def _command(shapes_dir, workdir, *extra):
  return [sys.executable, "-m", "segjax", "train", "--config", CONFIG,
          "--workdir", str(workdir), f"--config.dataset={SMALL_DATASET}",
          f"--config.data_dir={shapes_dir}", "--config.train.steps=8",
          "--config.eval.every_steps=4", *extra]


def _env(devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags(devices)
  return env


def _run(command, devices=8, timeout=300):
  done = subprocess.run(command, env=_env(devices), capture_output=True, text=True,
                        timeout=timeout, cwd=REPO)
  assert done.returncode == 0, done.stderr[-3000:]
  return done


def _params(workdir, step):
  return restore_on_host(os.path.join(workdir, "checkpoints", str(step)))["params"]


def _flat(tree):
  import jax
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _miou(workdir, step):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [r["miou"] for r in rows if r["split"] == "validation" and r["step"] == step][-1]


KILL_RUN = ("--config.train.steps=40", "--config.checkpoint.every_steps=4",
            "--config.eval.every_steps=8")


@pytest.fixture(scope="module")
def reference(shapes_dir, tmp_path_factory):
  """An uninterrupted 40-step run: checkpoints every 4 steps, evaluation every 8."""
  workdir = tmp_path_factory.mktemp("reference")
  _run(_command(shapes_dir, workdir, *KILL_RUN), devices=2)
  return workdir


def _wait_for(predicate, process, timeout=240, poll=0.05):
  deadline = time.time() + timeout
  while not predicate():
    assert process.poll() is None, process.stderr.read()[-3000:]
    assert time.time() < deadline, "timed out"
    time.sleep(poll)


class _Lines:
  """Collects a process's stdout lines on a thread (readable while it runs)."""

  def __init__(self, process):
    self.lines = []
    self.thread = threading.Thread(target=lambda: self.lines.extend(process.stdout),
                                   daemon=True)
    self.thread.start()

  def has(self, text):
    return any(text in line for line in list(self.lines))


def _rows(workdir):
  """metrics.jsonl rows without the timing column, which differs run to run."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  for row in rows:
    row.pop("images_per_sec", None)
  return rows


def _preempted_steps(out):
  """The steps a run's stdout says a preemption notice saved at."""
  return [int(m) for m in re.findall(r"preempted: saved checkpoint at step (\d+)", out)]


def _temporary_checkpoint(workdir):
  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and any("tmp" in d for d in os.listdir(directory))


def _kill_once(shapes_dir, workdir, kind, rng):
  """Starts (or resumes) the run and SIGKILLs it at one moment of `kind`:

    step        right after a random logged step (0-50 ms later: mid-step)
    eval        just after a step that is followed by an evaluation
    checkpoint  as soon as an async checkpoint write has begun (its
                temporary directory exists and has not been renamed yet)
    sigterm     a preemption notice (SIGTERM, not SIGKILL) after a random
                logged step: the run saves where it is and exits cleanly

  Returns (the step this life started from, the step a SIGTERM saved or None).
  """
  process = subprocess.Popen(_command(shapes_dir, workdir, *KILL_RUN), env=_env(2),
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
  out = _Lines(process)
  _wait_for(lambda: out.has("step ") or out.has("resuming"), process)
  resumed = [int(line.split()[-1]) for line in list(out.lines) if "resuming" in line]
  start = resumed[0] if resumed else 0
  if kind == "checkpoint":
    # A write cut short in an earlier life leaves a temporary directory of
    # the same name until orbax cleans it up: wait for a new one.
    _wait_for(lambda: not _temporary_checkpoint(workdir), process)
    _wait_for(lambda: _temporary_checkpoint(workdir), process, poll=0.001)
  else:
    every = 8 if kind == "eval" else 2
    # A notice needs a step after it to be acted on: not in the last ones.
    last = 36 if kind == "sigterm" else 40
    target = rng.choice(range(start + every - start % every, last + 1, every))
    _wait_for(lambda: out.has(f"step {target:>6d}/40"), process, poll=0.001)
    time.sleep(rng.uniform(0, 0.05))
  assert process.poll() is None, f"the run ended before the {kind} kill"
  if kind == "sigterm":
    process.send_signal(signal.SIGTERM)
    errors = []  # drained while it saves, so a full pipe cannot stall it
    drain = threading.Thread(target=lambda: errors.append(process.stderr.read()), daemon=True)
    drain.start()
    code = process.wait(timeout=120)
    drain.join()
    assert code == 0, errors[0][-3000:]
    out.thread.join()
    saved = _preempted_steps("".join(out.lines))
    assert len(saved) == 1 and saved[0] > start, out.lines[-5:]
    assert str(saved[0]) in os.listdir(os.path.join(workdir, "checkpoints"))
    return start, saved[0]
  process.send_signal(signal.SIGKILL)
  process.wait()
  if kind == "checkpoint":  # killed mid-write: the write was left unfinished
    assert _temporary_checkpoint(workdir)
  return start, None


def test_killed_anywhere_resumes_to_the_same_parameters(shapes_dir, reference,
                                                        tmp_path):
  rng = random.Random(8)
  # Each kind of moment once, in a random order.
  kinds = ["checkpoint", "eval", "step", "sigterm"]
  rng.shuffle(kinds)
  starts, saved = zip(*[_kill_once(shapes_dir, tmp_path, kind, rng) for kind in kinds])
  out = _run(_command(shapes_dir, tmp_path, *KILL_RUN), devices=2).stdout
  assert "resuming from checkpoint at step" in out or "nothing to train" in out
  assert any(starts), starts  # some lives resumed from a checkpoint
  assert not _temporary_checkpoint(tmp_path)  # unfinished writes were cleaned up
  want, got = _flat(_params(reference, 40)), _flat(_params(tmp_path, 40))
  assert want.keys() == got.keys()
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  # Every logged loss and evaluation, each once, bit for bit, but for the
  # train row whose 2-step interval the preemption cut, if it cut one: the
  # resumed run's row averages only the steps after the save.
  cut = {step + 1 for step in saved if step is not None and step % 2}
  rows = lambda workdir: [r for r in _rows(workdir)
                          if not (r["split"] == "train" and r["step"] in cut)]
  assert rows(tmp_path) == rows(reference)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# The stopped run is started for 400 steps and its reference for fewer: a
# learning rate that does not depend on train.steps keeps them comparable.
CONSTANT_LR = ("--config.optimizer.schedule=constant", "--config.optimizer.warmup_steps=0")


def test_two_processes_preempted_and_resumed_match_one(shapes_dir, tmp_path):
  """2 hosts x 2 devices: a preemption notice to one host (process 1) stops
  both at one step; a restart of both continues from it, evaluates every 4
  steps and ends with the parameters and mIoU of 1 host x 4 devices run
  without a stop."""
  def start(steps, *extra):
    port = _free_port()
    return [subprocess.Popen(
        _command(shapes_dir, two, f"--config.train.steps={steps}",
                 "--config.checkpoint.every_steps=1000", *CONSTANT_LR, *extra,
                 f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                 f"--process_id={i}"),
        env=_env(2), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]

  def outputs(processes):
    done = [process.communicate(timeout=400) for process in processes]
    for process, (out, err) in zip(processes, done):
      assert process.returncode == 0, err[-3000:]
    return [out for out, _ in done]

  two = tmp_path / "two"
  processes = start(400, "--config.eval.every_steps=1000")
  _wait_for((two / "metrics.jsonl").exists, processes[0])  # under way
  processes[1].send_signal(signal.SIGTERM)
  stopped = [step for out in outputs(processes) for step in _preempted_steps(out)]
  assert len(stopped) == 2 and stopped[0] == stopped[1], stopped
  step = stopped[0]
  assert 0 < step < 400
  assert os.listdir(two / "checkpoints") == [str(step)]

  end = step + 4
  out = outputs(start(end))
  assert f"resuming from checkpoint at step {step}" in out[0]
  assert sorted(os.listdir(two / "checkpoints")) == sorted([str(step), str(end)])

  one = tmp_path / "one"
  _run(_command(shapes_dir, one, "--config.data.num_shards=2", f"--config.train.steps={end}",
                "--config.checkpoint.every_steps=1000", *CONSTANT_LR), devices=4)
  want, got = _flat(_params(one, end)), _flat(_params(two, end))
  assert want.keys() == got.keys()  # no parameter missing or extra
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5,
                               atol=1e-5 * np.abs(want[name]).max(), err_msg=name)
  assert _miou(two, end) == pytest.approx(_miou(one, end), abs=1e-6)
