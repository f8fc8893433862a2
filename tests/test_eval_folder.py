"""`segjax eval` on a folder dataset of images of many sizes scores each image
at its own resolution: its mIoU equals segjax.metrics summed image by image."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from folder_data import write_folder
from segjax import cli, metrics
from segjax.data.builders import folder
from segjax.errors import DataError
from segjax.data.normalization import normalize
from segjax.train import loop

CONFIG = os.path.join(REPO, "configs", "unet_shapes.py:tiny")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("folder_set")
  # Four sizes, five images each: exact native-size inference compiles once
  # per size, so few sizes keep the test fast.
  sizes = [(37, 52), (64, 40), (45, 45), (80, 33)] * 5
  write_folder(root, sizes, "val", seed=1)
  write_folder(root, [(48, 48)] * 8, "train", seed=2)
  return root


def test_eval_equals_metrics_image_by_image(dataset, tmp_path, capsys):
  workdir = tmp_path / "run"
  data_dir = tmp_path / "tfds"
  common = [f"--config.dataset=folder:{dataset}", f"--config.data_dir={data_dir}",
            "--config.num_classes=2", "--config.eval.resize_to=None"]
  assert cli.main(["train", "--config", CONFIG, "--workdir", str(workdir),
                   *common]) == 0
  # Native size on exact canvases: the model sees each image as it is.
  assert cli.main(["eval", "--workdir", str(workdir), "--config.eval.bucket=1"]) == 0
  with open(workdir / "metrics.jsonl") as f:
    reported = json.loads(f.readlines()[-1])
  assert reported["split"] == "validation"

  config = json.loads((workdir / "config.json").read_text())
  with loop.Trainer(loop.config_lib.load_config(workdir / "config.json"),
                   str(workdir)) as trainer:
    state, _ = trainer.initial_state()
  variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  mean, std = config["augment"]["mean"], config["augment"]["std"]
  total = np.zeros((2, 2), np.int64)
  names = sorted(os.listdir(dataset / "images" / "val"))
  assert len(names) == 20
  apply = jax.jit(lambda x: trainer.model.apply(variables, x, train=False)["logits"])
  for name in names:
    image = np.asarray(Image.open(dataset / "images" / "val" / name).convert("RGB"))
    label = np.asarray(Image.open(dataset / "labels" / "val" / name))
    x = jnp.asarray(normalize(image, mean, std)[None])
    logits = apply(x)
    total += np.asarray(metrics.confusion_matrix(
        label[None].astype(np.int32), jnp.argmax(logits, -1), 2))
  assert reported["num_pixels"] == int(total.sum())
  assert reported["miou"] == metrics.scores(total)["miou"]
  assert reported["per_class_iou"] == metrics.scores(total)["per_class_iou"]


def test_folder_errors_name_the_file(tmp_path):
  write_folder(tmp_path / "set", [(20, 30)], "train", seed=0)
  os.remove(tmp_path / "set" / "labels" / "train" / "000.png")
  with pytest.raises(DataError, match="000.png"):
    folder.make_builder(f"folder:{tmp_path / 'set'}", str(tmp_path / "tfds"))
  with pytest.raises(DataError, match="does not exist"):
    folder.make_builder(f"folder:{tmp_path / 'nowhere'}", str(tmp_path / "tfds"))


def test_folder_label_of_another_size_is_refused_or_skipped(tmp_path):
  write_folder(tmp_path / "set", [(20, 30), (22, 24)], "train", seed=0)
  Image.fromarray(np.zeros((20, 31), np.uint8)).save(
      tmp_path / "set" / "labels" / "train" / "000.png")
  with pytest.raises(DataError, match="20x31"):
    folder.make_builder(f"folder:{tmp_path / 'set'}", str(tmp_path / "tfds"))
  builder = folder.make_builder(f"folder:{tmp_path / 'set'}", str(tmp_path / "tfds2"),
                                skip_bad_examples=True)
  assert builder.info.splits["train"].num_examples == 1
