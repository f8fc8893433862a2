"""The CLI end to end (in-process): train, eval, predict, and every bad input
stops with one message and exit status 2, leaving saved work intact."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, SMALL_DATASET, train_argv
from segjax import cli

CONFIG = os.path.join(REPO, "configs", "unet_shapes.py:tiny")


@pytest.fixture(scope="module")
def trained(shapes_dir, tmp_path_factory):
  """A tiny finished run: 4 steps, checkpoints at 2 and 4."""
  workdir = tmp_path_factory.mktemp("run")
  assert cli.main(train_argv(shapes_dir, workdir)) == 0
  return workdir


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_train_writes_the_workdir(trained, capsys):
  rows = _rows(trained)
  train_rows = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train_rows] == [2, 4]
  assert {"loss", "learning_rate", "images_per_sec"} <= set(train_rows[0])
  evals = [r for r in rows if r["split"] == "validation"]
  assert evals[-1]["step"] == 4 and len(evals[-1]["per_class_iou"]) == 4
  assert {"miou", "pixel_accuracy", "mean_accuracy", "fw_iou"} <= set(evals[-1])
  assert sorted(os.listdir(trained / "checkpoints")) == ["2", "4"]
  config = json.loads((trained / "config.json").read_text())
  assert config["model"] == "unet" and config["dataset"] == SMALL_DATASET
  assert os.listdir(trained / "tensorboard")


def test_eval_reads_the_workdir_config(trained, capsys):
  assert cli.main(["eval", "--workdir", str(trained), "--split", "test"]) == 0
  out = capsys.readouterr().out
  assert "test at step 4: mIoU" in out
  assert _rows(trained)[-1]["split"] == "test"


def test_predict_writes_masks_and_overlays(trained, tmp_path, capsys):
  rgb = np.random.default_rng(0).integers(0, 255, (40, 52, 3), np.uint8)
  Image.fromarray(rgb).save(tmp_path / "a.png")
  Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")  # one channel
  Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(tmp_path / "alpha.png")
  out = tmp_path / "out"
  images = [str(tmp_path / n) for n in ("a.png", "gray.png", "alpha.png")]
  assert cli.main(["predict", "--workdir", str(trained), "--output", str(out),
                   *images]) == 0
  mask = np.asarray(Image.open(out / "a_mask.png"))
  assert mask.shape == (40, 52, 3)
  assert np.asarray(Image.open(out / "gray_overlay.png")).shape == (40, 52, 3)
  labels = np.asarray(Image.open(out / "alpha_labels.png"))
  assert labels.shape == (40, 52) and labels.max() < 4


def _fails(argv, capsys, *phrases):
  code = cli.main(argv)
  err = capsys.readouterr().err
  assert code == 2, err
  assert "Traceback" not in err
  for phrase in phrases:
    assert phrase in err, err
  return err


def test_missing_config_file(tmp_path, capsys):
  _fails(["train", "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path)],
         capsys, "does not exist")


def test_unknown_config_key(shapes_dir, tmp_path, capsys):
  _fails(train_argv(shapes_dir, tmp_path, "--config.train.stepz=3"), capsys,
         "'train.stepz' does not exist", "did you mean steps")


def test_badly_typed_override(shapes_dir, tmp_path, capsys):
  _fails(train_argv(shapes_dir, tmp_path, "--config.train.steps=many"), capsys,
         "train.steps")


def test_unknown_model(shapes_dir, tmp_path, capsys):
  _fails(train_argv(shapes_dir, tmp_path, "--config.model=unet9"), capsys,
         "unknown model 'unet9'", "unet")


def test_unknown_dataset(shapes_dir, tmp_path, capsys):
  _fails(train_argv(shapes_dir, tmp_path, "--config.dataset=voc1999"), capsys,
         "voc1999", "segjax_shapes")


def test_empty_split(shapes_dir, tmp_path, capsys):
  _fails(train_argv(shapes_dir, tmp_path, "--config.eval.split=test[:0]"), capsys,
         "is empty")


def test_labels_out_of_range(shapes_dir, tmp_path, capsys):
  _fails(train_argv(shapes_dir, tmp_path, "--config.num_classes=3"), capsys,
         "label values [3] outside [0, 3)")


def test_unreadable_image(trained, tmp_path, capsys):
  (tmp_path / "broken.png").write_bytes(b"not a png")
  _fails(["predict", "--workdir", str(trained), "--output", str(tmp_path / "o"),
          str(tmp_path / "broken.png")], capsys, "broken.png", "cannot be decoded")


def test_eval_without_checkpoint(shapes_dir, tmp_path, capsys):
  _fails(["eval", "--config", CONFIG, "--workdir", str(tmp_path),
          f"--config.dataset={SMALL_DATASET}", f"--config.data_dir={shapes_dir}"],
         capsys, "no checkpoint")


def test_nan_loss_stops_and_keeps_checkpoints(trained, shapes_dir, tmp_path, capsys):
  # The finished run saved steps 2 and 4; continuing with an absurd learning
  # rate diverges, stops with a message, and leaves those checkpoints
  # restorable.
  shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
  _fails(train_argv(shapes_dir, tmp_path, "--config.train.steps=12",
               "--config.optimizer.learning_rate=1e30"),
         capsys, "NaN/Inf", "learning_rate")
  assert cli.main(["eval", "--workdir", str(tmp_path), "--config", CONFIG,
                   f"--config.dataset={SMALL_DATASET}",
                   f"--config.data_dir={shapes_dir}", "--step", "4"]) == 0
