"""Runs in subprocesses: kill and resume, SIGTERM, and 2 hosts x 2 devices.

Each case compares final parameters read back from the checkpoints with a
reference run's.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, SMALL_DATASET
from segjax.train.checkpoint import restore_on_host

pytestmark = pytest.mark.slow
CONFIG = os.path.join(REPO, "configs", "unet_shapes.py:tiny")


def _command(shapes_dir, workdir, *extra):
  return [sys.executable, "-m", "segjax", "train", "--config", CONFIG,
          "--workdir", str(workdir), f"--config.dataset={SMALL_DATASET}",
          f"--config.data_dir={shapes_dir}", "--config.train.steps=8",
          "--config.eval.every_steps=4", *extra]


def _env(devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
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


@pytest.fixture(scope="module")
def reference(shapes_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  _run(_command(shapes_dir, workdir))
  return workdir


def _wait_for(predicate, process, timeout=240):
  deadline = time.time() + timeout
  while not predicate():
    assert process.poll() is None, process.stderr.read()[-3000:]
    assert time.time() < deadline, "timed out"
    time.sleep(0.05)


def test_killed_run_resumes_to_the_same_parameters(shapes_dir, reference, tmp_path):
  process = subprocess.Popen(_command(shapes_dir, tmp_path), env=_env(8), cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
  checkpoint = tmp_path / "checkpoints" / "4"
  _wait_for(checkpoint.exists, process)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not (tmp_path / "checkpoints" / "8").exists()
  out = _run(_command(shapes_dir, tmp_path)).stdout
  assert "resuming from checkpoint at step" in out
  want, got = _flat(_params(reference, 8)), _flat(_params(tmp_path, 8))
  assert want.keys() == got.keys()
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  assert _miou(tmp_path, 8) == _miou(reference, 8)


def test_sigterm_saves_and_exits_cleanly(shapes_dir, tmp_path):
  command = _command(shapes_dir, tmp_path, "--config.train.steps=400",
                     "--config.checkpoint.every_steps=1000",
                     "--config.eval.every_steps=1000")
  process = subprocess.Popen(command, env=_env(8), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  _wait_for((tmp_path / "metrics.jsonl").exists, process)  # training is under way
  process.send_signal(signal.SIGTERM)
  out, err = process.communicate(timeout=120)
  assert process.returncode == 0, err[-3000:]
  steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
  assert len(steps) == 1 and 0 < steps[0] < 400
  assert f"preempted: saved checkpoint at step {steps[0]}" in out


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(shapes_dir, tmp_path):
  one = tmp_path / "one"
  _run(_command(shapes_dir, one, "--config.data.num_shards=2"), devices=4)
  two = tmp_path / "two"
  port = _free_port()
  processes = [
      subprocess.Popen(
          _command(shapes_dir, two, f"--coordinator_address=127.0.0.1:{port}",
                   "--num_processes=2", f"--process_id={i}"),
          env=_env(2), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          text=True)
      for i in range(2)]
  for process in processes:
    out, err = process.communicate(timeout=400)
    assert process.returncode == 0, err[-3000:]
  want, got = _flat(_params(one, 8)), _flat(_params(two, 8))
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5,
                               atol=1e-5 * np.abs(want[name]).max(), err_msg=name)
  assert _miou(two, 8) == pytest.approx(_miou(one, 8), abs=1e-6)
