"""cityscapes on fake leftImg8bit/ + gtFine/ trees (and their zips)."""
import json
import os
import shutil
import zipfile

import numpy as np
import pytest

import fake_downloads as fake
from segjax import errors
from segjax.data import builders
from segjax.data.builders import cityscapes

H, W = 4, 8
FRAMES = {  # split folder -> (city, frame) pairs
    "train": [("aachen", "000000_000019"), ("aachen", "000001_000019")],
    "val": [("frankfurt", "000000_000294")],
    "test": [("berlin", "000000_000019")],
}


def _label_ids():
  """labelIds: road (7), car (26), unlabeled (0), ego vehicle (1), bicycle (33)."""
  ids = np.full((H, W), 7, np.uint8)
  ids[0, :2] = 26
  ids[1, :2] = 0
  ids[2, :2] = 1
  ids[3, :2] = 33
  return ids


def _image(seed):
  return np.random.default_rng(seed).integers(0, 256, (H, W, 3), np.uint8)


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("cityscapes_manual")
  for seed, (folder, frames) in enumerate(FRAMES.items()):
    for k, (city, frame) in enumerate(frames):
      stem = f"{city}_{frame}"
      fake.write_image(
          root / "leftImg8bit" / folder / city / f"{stem}_leftImg8bit.png",
          _image(10 * seed + k))
      gt = root / "gtFine" / folder / city
      # The test split's gtFine files are dummies: never read.
      ids = _label_ids() if folder != "test" else np.zeros((H, W), np.uint8)
      fake.write_grey_png(gt / f"{stem}_gtFine_labelIds.png", ids)
      # The other gtFine files of a frame, which must not be mistaken for it.
      fake.write_grey_png(gt / f"{stem}_gtFine_instanceIds.png", ids)
      fake.write_image(gt / f"{stem}_gtFine_color.png",
                       np.zeros((H, W, 3), np.uint8))
      with open(gt / f"{stem}_gtFine_polygons.json", "w") as f:
        json.dump({"imgHeight": H, "imgWidth": W, "objects": []}, f)
  return root


@pytest.fixture(scope="module")
def built(manual_dir, tmp_path_factory):
  return builders.load_builder("cityscapes",
                               str(tmp_path_factory.mktemp("cs_data")),
                               manual_dir=str(manual_dir))


def test_splits_and_train_ids(built):
  assert built.name == "segjax_cityscapes"
  assert fake.split_sizes(built) == {"train": 2, "validation": 1, "test": 1}
  train = fake.examples(built, "train")
  assert set(train) == {"aachen_000000_000019_leftImg8bit.png",
                        "aachen_000001_000019_leftImg8bit.png"}
  expected = np.full((H, W), 0, np.uint8)  # road: labelId 7 -> 0
  expected[0, :2] = 13   # car: 26 -> 13
  expected[1:3, :2] = 255  # unlabeled (0), ego vehicle (1) -> ignore
  expected[3, :2] = 18   # bicycle: 33 -> 18
  for ex in train.values():
    np.testing.assert_array_equal(ex["segmentation_mask"][..., 0], expected)
  # PNG images are stored as they are: exact pixels.
  np.testing.assert_array_equal(
      train["aachen_000001_000019_leftImg8bit.png"]["image"], _image(1))


def test_test_split_is_all_ignore(built):
  (ex,) = fake.examples(built, "test").values()
  assert ex["image"].shape == (H, W, 3)
  assert np.all(ex["segmentation_mask"] == 255)


def test_reads_the_zips_in_place(manual_dir, built, tmp_path):
  packed = tmp_path / "manual"
  packed.mkdir()
  for archive, top in ((cityscapes.IMAGES_ARCHIVE, "leftImg8bit"),
                       (cityscapes.LABELS_ARCHIVE, "gtFine")):
    with zipfile.ZipFile(packed / archive, "w") as z:
      z.writestr("README", "fake")
      for dirpath, _, names in os.walk(manual_dir / top):
        for name in names:
          path = os.path.join(dirpath, name)
          z.write(path, os.path.relpath(path, manual_dir))
  from_zip = fake.examples(
      fake.build(cityscapes.Cityscapes, tmp_path / "data", packed), "train")
  from_folder = fake.examples(built, "train")
  assert set(from_zip) == set(from_folder)
  for name, ex in from_zip.items():
    np.testing.assert_array_equal(ex["segmentation_mask"],
                                  from_folder[name]["segmentation_mask"])
    np.testing.assert_array_equal(ex["image"], from_folder[name]["image"])


def test_missing_annotations(manual_dir, tmp_path):
  images_only = tmp_path / "images_only"
  shutil.copytree(manual_dir / "leftImg8bit", images_only / "leftImg8bit")
  with pytest.raises(errors.DataError) as info:
    fake.build(cityscapes.Cityscapes, tmp_path / "data", images_only)
  message = str(info.value)
  assert "gtFine" in message and cityscapes.LABELS_ARCHIVE in message
  assert str(images_only / "gtFine") in message


def test_label_of_another_size_is_a_bad_example(manual_dir, tmp_path):
  broken = tmp_path / "broken"
  shutil.copytree(manual_dir, broken)
  for city, frame in (FRAMES["train"][0], FRAMES["val"][0]):
    split = "train" if city == "aachen" else "val"
    fake.write_grey_png(
        broken / "gtFine" / split / city / f"{city}_{frame}_gtFine_labelIds.png",
        np.zeros((H + 1, W), np.uint8))
  with pytest.raises(errors.DataError,
                     match="aachen_000000_000019_gtFine_labelIds.png is 5x8"):
    fake.build(cityscapes.Cityscapes, tmp_path / "a", broken)
  # Skipping leaves validation empty, which is an error of its own.
  with pytest.raises(errors.DataError, match="validation: all 1 examples"):
    fake.build(cityscapes.Cityscapes, tmp_path / "b", broken,
               skip_bad_examples=True)
  fake.write_grey_png(
      broken / "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png",
      _label_ids())
  builder = fake.build(cityscapes.Cityscapes, tmp_path / "c", broken,
                       skip_bad_examples=True)
  assert fake.split_sizes(builder) == {"train": 1, "validation": 1, "test": 1}


def test_dataset_info():
  info = builders.DATASET_INFO["cityscapes"]
  assert info["num_classes"] == 19
  assert info["class_names"][0] == "road" and info["class_names"][13] == "car"
  assert info["class_names"][18] == "bicycle"
  np.testing.assert_array_equal(info["palette"][0], (128, 64, 128))
  np.testing.assert_array_equal(info["palette"][13], (0, 0, 142))
