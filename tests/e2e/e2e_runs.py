"""A config's tiny mode end to end, as a user runs it, on a fake download.

    load_builder(dataset, data_dir, manual_dir=...)      # prepare, once
    segjax train   --config configs/<x>.py:tiny --workdir W --config.data_dir=D
    segjax eval    --workdir W
    segjax predict --workdir W --output O image.jpg ...

Each step goes through `segjax.cli.main` in this process (what the console
script calls), so the runs share the already imported JAX and TensorFlow.
The downloads (tests/data/fake_downloads.py) are in the datasets' real
layouts, with images of several sizes like the real ones; nothing in the
runs is overridden, so each one evaluates by its config's own `eval` block.
"""
import contextlib
import dataclasses
import io
import json
import math
import os
import sys

import numpy as np
from PIL import Image

from conftest import REPO
from segjax import cli
from segjax.data.builders import load_builder

sys.path.insert(0, os.path.join(REPO, "tests", "data"))
import fake_downloads  # noqa: E402  (tests/data holds no package)

CHECKPOINT_STEPS = ["2", "4"]  # tiny mode: 4 steps, a checkpoint every 2


@dataclasses.dataclass
class Run:
  download: "fake_downloads.Download"
  workdir: str
  output: str
  train_out: str
  eval_out: str
  predict_out: str
  rows: list
  config: dict  # the run's config.json


def _cli(argv):
  """(exit code, stdout + stderr) of `segjax <argv>` run in-process."""
  buffer = io.StringIO()
  with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
    code = cli.main(argv)
  return code, buffer.getvalue()


def run(config, make_download, tmp_path, dataset=None):
  """Prepares the fake download, trains `config`'s tiny mode, evaluates and
  predicts through the CLI; asserts that each command exits 0."""
  download = make_download(tmp_path / "manual")
  dataset = dataset or download.dataset
  data_dir = str(tmp_path / "tfds")
  load_builder(dataset, data_dir, manual_dir=download.manual_dir)
  workdir, output = str(tmp_path / "workdir"), str(tmp_path / "predicted")
  config_path = os.path.join(REPO, "configs", f"{config}:tiny")
  code, train_out = _cli(["train", "--config", config_path, "--workdir", workdir,
                          f"--config.data_dir={data_dir}"])
  assert code == 0, train_out
  code, eval_out = _cli(["eval", "--workdir", workdir])
  assert code == 0, eval_out
  code, predict_out = _cli(["predict", "--workdir", workdir, "--output", output,
                            *download.images])
  assert code == 0, predict_out
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  with open(os.path.join(workdir, "config.json")) as f:
    resolved = json.load(f)
  return Run(download, workdir, output, train_out, eval_out, predict_out, rows,
             resolved)


def finite(*values):
  return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def check_training(result):
  """Checkpoints at steps 2 and 4; train rows with finite losses; the
  in-loop evaluation at step 4."""
  assert sorted(os.listdir(os.path.join(result.workdir, "checkpoints"))) == CHECKPOINT_STEPS
  train = [r for r in result.rows if r["split"] == "train"]
  assert [r["step"] for r in train] == [2, 4]
  assert all(finite(r["loss"], r["learning_rate"]) for r in train), train
  assert all(r["nonfinite_steps"] == 0 for r in train), train
  evals = [r for r in result.rows if r["split"] == "validation"]
  assert evals and evals[0]["step"] == 4, result.rows
  return evals


def check_semantic(result, num_classes):
  """mIoU rows (in-loop and `segjax eval`) with finite figures over every
  class, the eval line printed, and the three PNGs of every predicted image
  at that image's size."""
  evals = check_training(result)
  assert len(evals) == 2, evals  # training's, then segjax eval's
  for row in evals:
    assert row["step"] == 4
    assert finite(row["miou"], row["pixel_accuracy"], row["mean_accuracy"]), row
    assert 0 <= row["miou"] <= 1 and len(row["per_class_iou"]) == num_classes
  assert f"validation at step 4: mIoU {evals[-1]['miou']:.4f}" in result.eval_out
  # One evaluation: training logged what segjax eval gives for the checkpoint.
  for key in ("miou", "pixel_accuracy", "per_class_iou", "num_pixels"):
    assert evals[0][key] == evals[1][key], key
  for path, (h, w) in zip(result.download.images, result.download.sizes):
    stem = os.path.join(result.output, os.path.splitext(os.path.basename(path))[0])
    labels = np.asarray(Image.open(f"{stem}_labels.png"))
    assert labels.shape == (h, w) and labels.max() < num_classes
    assert np.asarray(Image.open(f"{stem}_mask.png")).shape == (h, w, 3)
    assert np.asarray(Image.open(f"{stem}_overlay.png")).shape == (h, w, 3)
