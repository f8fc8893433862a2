"""ade20k on a fake ADEChallengeData2016.zip (and the extracted folder)."""
import os
import shutil
import zipfile

import numpy as np
import pytest

import fake_downloads as fake
from conftest import tiny_config
from segjax import errors
from segjax.data import builders, pipeline
from segjax.data.builders import ade20k

H, W = 5, 7
STEMS = {"training": ["ADE_train_00000001", "ADE_train_00000002",
                      "ADE_train_00000003"],
         "validation": ["ADE_val_00000001", "ADE_val_00000002"]}


def _annotation():
  """Raw ADE ids: 0 ("other"), 1 (wall), 13 (person), 150 (flag)."""
  ids = np.ones((H, W), np.uint8)
  ids[0, :] = 0
  ids[1, :3] = 13
  ids[4, 6] = 150
  return ids


def _write_tree(root):
  top = root / "ADEChallengeData2016"
  fake.write_text(top / "objectInfo150.txt",
                  ["Idx\tRatio\tTrain\tVal\tName", "1\t0.1576\t11664\t1172\twall"])
  fake.write_text(top / "sceneCategories.txt", ["ADE_train_00000001 airport"])
  for folder, stems in STEMS.items():
    for stem in stems:
      fake.write_image(top / "images" / folder / f"{stem}.jpg",
                       fake.solid(H, W, (40, 80, 160)))
      fake.write_grey_png(top / "annotations" / folder / f"{stem}.png",
                          _annotation())
  return top


@pytest.fixture(scope="module")
def zipped(tmp_path_factory):
  """<manual_dir>/ADEChallengeData2016.zip, as downloaded."""
  tree = _write_tree(tmp_path_factory.mktemp("ade_tree"))
  manual_dir = tmp_path_factory.mktemp("ade_manual")
  with zipfile.ZipFile(manual_dir / ade20k.ARCHIVE, "w") as z:
    for dirpath, _, names in os.walk(tree):
      for name in names:
        path = os.path.join(dirpath, name)
        z.write(path, os.path.relpath(path, tree.parent))
  return manual_dir, tree


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("ade"))


@pytest.fixture(scope="module")
def built(zipped, data_dir):
  return builders.load_builder("ade20k", data_dir, manual_dir=str(zipped[0]))


def test_splits_and_reduce_zero_label(built):
  assert fake.split_sizes(built) == {"train": 3, "validation": 2}
  train = fake.examples(built, "train")
  assert set(train) == {f"{s}.jpg" for s in STEMS["training"]}
  expected = np.zeros((H, W), np.uint8)  # wall: 1 -> 0
  expected[0, :] = 255  # "other": 0 -> ignore
  expected[1, :3] = 12  # person: 13 -> 12
  expected[4, 6] = 149  # flag: 150 -> 149
  for ex in train.values():
    assert ex["image"].shape == (H, W, 3)
    np.testing.assert_array_equal(ex["segmentation_mask"][..., 0], expected)
  names = builders.DATASET_INFO["ade20k"]["class_names"]
  assert (names[0], names[12], names[149]) == ("wall", "person", "flag")


def test_training_pipeline_reads_it_unchanged(built, data_dir):
  # The trainer calls load_builder without manual_dir: the prepared data
  # is read as it is, through the same keys as segjax_shapes.
  config = tiny_config(data_dir, "dataset=ade20k", "num_classes=150")
  batch = next(pipeline.train_batches(config, process_index=0,
                                      process_count=1))
  assert batch["label"].dtype == np.int32
  values = set(np.unique(batch["label"]).tolist())
  assert values <= set(range(150)) | {255} and values - {255}


def test_extracted_folder_gives_the_same(zipped, built, tmp_path):
  _, tree = zipped
  manual_dir = tmp_path / "manual"
  shutil.copytree(tree, manual_dir / "ADEChallengeData2016")
  builder = fake.build(ade20k.Ade20k, tmp_path / "data", manual_dir)
  a, b = fake.examples(builder, "validation"), fake.examples(built, "validation")
  assert set(a) == set(b)
  for name in a:
    np.testing.assert_array_equal(a[name]["segmentation_mask"],
                                  b[name]["segmentation_mask"])


def test_unknown_label_id_names_the_file(zipped, tmp_path):
  _, tree = zipped
  manual_dir = tmp_path / "manual"
  shutil.copytree(tree, manual_dir / "ADEChallengeData2016")
  bad = np.full((H, W), 151, np.uint8)
  fake.write_grey_png(manual_dir / "ADEChallengeData2016/annotations/"
                      "validation/ADE_val_00000002.png", bad)
  with pytest.raises(errors.DataError,
                     match=r"ADE_val_00000002.png has ids \[151\]"):
    fake.build(ade20k.Ade20k, tmp_path / "data", manual_dir)


def test_missing_zip(tmp_path):
  fake.write_text(tmp_path / "manual" / "readme.txt", ["nothing here"])
  with pytest.raises(errors.DataError) as info:
    fake.build(ade20k.Ade20k, tmp_path / "data", tmp_path / "manual")
  message = str(info.value)
  assert str(tmp_path / "manual" / ade20k.ARCHIVE) in message
  assert "ADEChallengeData2016" in message and "Download" in message


def test_dataset_info():
  info = builders.DATASET_INFO["ade20k"]
  assert info["num_classes"] == 150 and len(info["class_names"]) == 150
  assert info["palette"].shape == (150, 3)
  np.testing.assert_array_equal(info["palette"][0], (120, 120, 120))
