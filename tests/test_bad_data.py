"""Bad data through the CLI: each case names the file and what is wrong and
exits with status 2, or (grey, RGBA and palette images) is read as RGB."""
import logging
import os

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from folder_data import write_folder
from segjax import cli

CONFIG = os.path.join(REPO, "configs", "unet_shapes.py:tiny")


def _train(root, tmp_path, *extra):
  return ["train", "--config", CONFIG, "--workdir", str(tmp_path / "run"),
          f"--config.dataset=folder:{root}", f"--config.data_dir={tmp_path / 'tfds'}",
          "--config.num_classes=2", "--config.train.steps=2",
          "--config.eval.every_steps=2", *extra]


def _dataset(root):
  write_folder(root, [(24, 30), (28, 20), (32, 32)], "train", seed=0)
  write_folder(root, [(24, 24)], "val", seed=1)
  return root


def _fails(argv, capsys, *phrases):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err and err.count("error:") == 1, err  # one message
  for phrase in phrases:
    assert phrase in err, err


def test_corrupt_image_is_named(tmp_path, capsys):
  root = _dataset(tmp_path / "set")
  path = root / "images" / "train" / "001.png"
  path.write_bytes(path.read_bytes()[:60])  # cut short, as by an interrupted copy
  _fails(_train(root, tmp_path), capsys, "001.png", "cannot decode image")


def test_empty_split_is_named(tmp_path, capsys):
  root = _dataset(tmp_path / "set")
  for folder in ("images", "labels"):
    for name in os.listdir(root / folder / "train"):
      os.remove(root / folder / "train" / name)
  _fails(_train(root, tmp_path), capsys, "no examples found", str(root / "images" / "train"))


def test_label_values_out_of_range_are_named(tmp_path, capsys):
  root = _dataset(tmp_path / "set")
  label = np.asarray(Image.open(root / "labels" / "train" / "002.png")).copy()
  label[5, 5] = 7
  Image.fromarray(label).save(root / "labels" / "train" / "002.png")
  _fails(_train(root, tmp_path), capsys, "label values [7] outside [0, 2)",
         "num_classes")


def _recolour(path, mode):
  image = Image.open(path).convert("RGB")
  image = image.convert(mode) if mode != "P" else image.quantize(16)
  image.save(path)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
  """A training split with a grey, an RGBA and a palette image, and one label
  map whose size differs from its image's."""
  root = tmp_path_factory.mktemp("mixed")
  write_folder(root, [(24, 30), (28, 20), (32, 32), (26, 26), (30, 22)], "train", seed=0)
  write_folder(root, [(24, 24)], "val", seed=1)
  for name, mode in (("001.png", "L"), ("002.png", "RGBA"), ("003.png", "P")):
    _recolour(root / "images" / "train" / name, mode)
  Image.fromarray(np.zeros((24, 31), np.uint8)).save(root / "labels" / "train" / "000.png")
  return root


@pytest.fixture(scope="module")
def trained(mixed, tmp_path_factory):
  """Trained on `mixed` with data.skip_bad_examples: (workdir, log text)."""
  tmp_path = tmp_path_factory.mktemp("trained")
  handler = _Collect()
  logging.getLogger().addHandler(handler)
  try:
    assert cli.main(_train(mixed, tmp_path, "--config.data.skip_bad_examples=true")) == 0
  finally:
    logging.getLogger().removeHandler(handler)
  return tmp_path / "run", "\n".join(handler.messages)


class _Collect(logging.Handler):
  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def test_label_of_another_size_is_named(mixed, tmp_path, capsys):
  _fails(_train(mixed, tmp_path), capsys, "000.png", "24x31",
         "--config.data.skip_bad_examples=true")


def test_bad_examples_are_skipped_and_counted_when_asked(trained):
  workdir, log = trained
  assert "skipped 1 bad example" in log and "000.png" in log
  assert os.path.isdir(workdir / "checkpoints" / "2")


def test_grey_rgba_and_palette_images_are_predicted(trained, tmp_path):
  images = []
  for mode in ("L", "LA", "RGBA", "P", "I;16"):
    path = tmp_path / f"input_{mode.replace(';', '')}.png"
    array = np.random.default_rng(0).integers(0, 255, (21, 27, 3), np.uint8)
    image = Image.fromarray(array)
    if mode == "I;16":
      image = Image.fromarray(array[..., 0].astype(np.uint16) * 256)
    elif mode == "P":
      image = image.quantize(8)
    else:
      image = image.convert(mode)
    image.save(path)
    images.append(str(path))
  out = tmp_path / "predictions"
  assert cli.main(["predict", "--workdir", str(trained[0]), "--output", str(out),
                   *images]) == 0
  for path in images:
    stem = os.path.splitext(os.path.basename(path))[0]
    for suffix in ("mask", "overlay", "labels"):
      assert Image.open(out / f"{stem}_{suffix}.png").size == (27, 21)


def test_predict_names_unreadable_and_missing_files(trained, mixed, tmp_path, capsys):
  cut = tmp_path / "cut.png"
  cut.write_bytes((mixed / "images" / "val" / "000.png").read_bytes()[:80])
  predict = ["predict", "--workdir", str(trained[0]), "--output", str(tmp_path / "o")]
  _fails(predict + [str(cut)], capsys, "cut.png", "cannot be decoded")
  _fails(predict + [str(tmp_path / "absent.jpg")], capsys, "absent.jpg", "does not exist")
