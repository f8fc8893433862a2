"""One evaluation for `segjax train` and `segjax eval`, spread over every
device of every host (segjax/evaluation.py): on a split of images of
different sizes whose count is not a multiple of the devices, 8 devices
give 1 device's confusion matrix bit for bit, 2 processes x 2 devices give
1 x 4's, the figure logged in training is `segjax eval --step`'s, and a
failing evaluation never costs the checkpoint of its step."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, xla_flags
from folder_data import write_folder
from segjax import cli, metrics
from segjax import config as config_lib
from segjax.errors import DataError
from segjax.tasks import semantic
from segjax.train import loop

pytestmark = pytest.mark.slow(seconds=90)
CONFIG = os.path.join(REPO, "configs", "unet_shapes.py:tiny")
# 13 images (not a multiple of 8) in three orientations and sizes.
SIZES = [(37, 52), (64, 40), (45, 45), (52, 37), (40, 64)] * 2 + [(33, 70), (70, 33), (48, 48)]
PROTOCOLS = {
    "whole": [],
    "slide_scales_flip": ["eval.mode=slide", "eval.crop_size=32,32", "eval.stride=21,21",
                          "eval.scales=0.75,1.0", "eval.flip=True"],
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("sizes")
  write_folder(root, SIZES, "val", seed=3)
  write_folder(root, [(48, 48)] * 8, "train", seed=4)
  return root


def _overrides(dataset, data_dir, *extra):
  return [f"dataset=folder:{dataset}", f"data_dir={data_dir}", "num_classes=2",
          "eval.resize_to=None", "eval.batch_size=8", *extra]


@pytest.fixture(scope="module")
def data_dir(dataset, tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def state(dataset, data_dir, tmp_path_factory):
  """A tiny U-Net's initial state on the host; the folder dataset prepared."""
  config = config_lib.load_config(CONFIG, _overrides(dataset, data_dir))
  with loop.Trainer(config, str(tmp_path_factory.mktemp("init")),
                    devices=jax.devices()[:1]) as trainer:
    state, _ = trainer.initial_state()
    return jax.device_get(trainer.par.host_state(state))


def _confusion(dataset, data_dir, state, protocol, num_devices, monkeypatch, tmp_path):
  seen = []
  scores = metrics.scores
  monkeypatch.setattr(metrics, "scores", lambda cm: seen.append(cm) or scores(cm))
  config = config_lib.load_config(CONFIG, _overrides(dataset, data_dir,
                                                     *PROTOCOLS[protocol]))
  with loop.Trainer(config, str(tmp_path), devices=jax.devices()[:num_devices]) as trainer:
    result = trainer.evaluate(trainer.par.put_state(state))
    compilations = trainer.task.segmenter.compilations
  (confusion,) = seen
  return np.asarray(confusion), result, compilations


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_eight_devices_equal_one_bit_for_bit(dataset, data_dir, state, protocol,
                                             monkeypatch, tmp_path):
  one, result, compilations = _confusion(dataset, data_dir, state, protocol, 1,
                                         monkeypatch, tmp_path / "one")
  eight, _, _ = _confusion(dataset, data_dir, state, protocol, 8, monkeypatch,
                           tmp_path / "eight")
  np.testing.assert_array_equal(eight, one)
  # Every labelled pixel of every image once (write_folder ignores two rows).
  assert one.sum() == result["num_pixels"] == sum((h - 2) * w for h, w in SIZES)
  # One program per canvas (sides rounded up to 32): 64x64, 64x96, 96x64.
  assert compilations == 3


def test_failing_evaluation_keeps_the_checkpoint_of_its_step(dataset, data_dir,
                                                             monkeypatch, tmp_path, capsys):
  def broken(self, state, split, progress=None):
    raise DataError("image 007.png: broken on purpose")
  monkeypatch.setattr(semantic.SemanticTask, "evaluate", broken)
  workdir = tmp_path / "run"
  argv = ["train", "--config", CONFIG, "--workdir", str(workdir),
          *[f"--config.{o}" for o in _overrides(dataset, data_dir)],
          "--config.train.steps=4", "--config.eval.every_steps=2",
          "--config.checkpoint.every_steps=2"]
  assert cli.main(argv) == 2
  assert "image 007.png" in capsys.readouterr().err
  assert os.listdir(workdir / "checkpoints") == ["2"]


def _rows(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f if '"validation"' in line]


def test_training_figure_is_segjax_eval_figure(dataset, data_dir, tmp_path):
  """Evaluated at step 2 of 3 in training, then `segjax eval --step 2` on 2
  processes x 2 devices and on 1 x 4: the same figures, bit for bit. (The
  tests/e2e runs check the same for slide, scales and flips.)"""
  workdir = tmp_path / "run"
  assert cli.main(["train", "--config", CONFIG, "--workdir", str(workdir),
                   *[f"--config.{o}" for o in _overrides(dataset, data_dir)],
                   "--config.train.steps=3", "--config.eval.every_steps=2",
                   "--config.checkpoint.every_steps=2"]) == 0
  in_loop = {r["step"]: r for r in _rows(workdir)}
  assert sorted(in_loop) == [2, 3]

  def evaluate(processes, devices):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    extra = (lambda i: [f"--coordinator_address=127.0.0.1:{port}",
                        f"--num_processes={processes}", f"--process_id={i}"]
             ) if processes > 1 else (lambda i: [])
    env = {**os.environ, "XLA_FLAGS": xla_flags(devices)}
    running = [subprocess.Popen(
        [sys.executable, "-m", "segjax", "eval", "--workdir", str(workdir), "--step", "2",
         *extra(i)], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(processes)]
    for process in running:
      _, err = process.communicate(timeout=300)
      assert process.returncode == 0, err[-3000:]
    return _rows(workdir)[-1]

  for processes, devices in ((1, 4), (2, 2)):
    row = evaluate(processes, devices)
    assert row["step"] == 2
    for key in ("miou", "pixel_accuracy", "per_class_iou", "num_pixels"):
      assert row[key] == in_loop[2][key], (processes, devices, key)


@pytest.mark.parametrize("error,expected", [
    (jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory"), DataError),
    (TypeError("a bug"), TypeError)])
def test_runtime_failure_names_its_images_and_a_bug_stays_a_bug(error, expected):
  from segjax import evaluation, inference, models
  segmenter = inference.Segmenter(models.build("unet", num_classes=2, base_width=4, depth=2,
                                               padding="same"),
                                  inference.InferenceOptions(mode="whole"))
  scorer = evaluation.ShardedScorer(segmenter, 2, jax.devices()[:2])

  def fail(*args):
    raise error
  scorer._call = fail
  examples = [(f"img{i}.png", np.zeros((20, 30, 3), np.float32), np.zeros((20, 30), np.int32))
              for i in range(3)]
  with pytest.raises(expected) as caught:
    scorer(None, examples)
  if expected is DataError:
    assert "img0.png, img1.png" in str(caught.value) and "out of memory" in str(caught.value)
