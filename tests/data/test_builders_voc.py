"""voc2012_segmentation on a fake VOCdevkit + SBD in their real layouts."""
import logging
import os
import shutil
import tarfile

import numpy as np
import pytest
import scipy.io
import scipy.sparse

import fake_downloads as fake
from segjax import errors
from segjax.data import builders
from segjax.data.builders import voc

H, W = 6, 8
VOC_TRAIN = ["2007_000032", "2007_000039"]
VOC_VAL = ["2007_000033", "2007_000042"]
SBD_TRAIN = ["2007_000032", "2008_000002", "2007_000033"]  # 033 is VOC val.
SBD_VAL = ["2008_000003"]  # Its image is only in SBD's img/.
TRAIN_AUG = {"2007_000032", "2007_000039", "2008_000002", "2008_000003"}


def _voc_label():
  """Palette indices: a person (15) block, a void (255) border row."""
  ids = np.zeros((H, W), np.uint8)
  ids[1:4, 2:6] = 15
  ids[4, :] = 255
  return ids


def _write_sbd_mat(path, segmentation):
  """SBD's cls/<id>.mat: struct GTcls with Segmentation, Boundaries (a
  20x1 cell of sparse edge maps) and CategoriesPresent."""
  boundaries = np.empty((20, 1), object)
  for k in range(20):
    boundaries[k, 0] = scipy.sparse.csc_matrix((H, W))
  present = np.unique(segmentation[segmentation > 0]).astype(np.uint8)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  scipy.io.savemat(path, {"GTcls": {
      "Segmentation": segmentation.astype(np.uint8),
      "Boundaries": boundaries,
      "CategoriesPresent": present.reshape(-1, 1)}})


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("voc_manual")
  voc_root = root / "VOCdevkit" / "VOC2012"
  for image_id in VOC_TRAIN + VOC_VAL + ["2008_000002"]:
    image = fake.solid(H, W, (200, 30, 60))
    if image_id == "2007_000039":
      image = np.full((H, W), 90, np.uint8)  # A grey JPEG, as VOC has some.
    fake.write_image(voc_root / "JPEGImages" / f"{image_id}.jpg", image)
  for image_id in VOC_TRAIN + VOC_VAL:
    fake.write_palette_png(voc_root / "SegmentationClass" / f"{image_id}.png",
                           _voc_label())
  lists = voc_root / "ImageSets" / "Segmentation"
  fake.write_text(lists / "train.txt", VOC_TRAIN)
  fake.write_text(lists / "val.txt", VOC_VAL)
  fake.write_text(lists / "trainval.txt", VOC_TRAIN + VOC_VAL)

  sbd = root / "benchmark_RELEASE" / "dataset"
  fake.write_text(sbd / "train.txt", SBD_TRAIN)
  fake.write_text(sbd / "val.txt", SBD_VAL)
  for image_id in SBD_TRAIN + SBD_VAL:
    seg = np.zeros((H, W), np.uint8)
    # VOC has a PNG for 2007_000032: its SBD label (all 3) must not be used.
    seg[:] = 3 if image_id == "2007_000032" else 0
    seg[2:5, 1:4] = 7 if image_id != "2007_000032" else 3
    _write_sbd_mat(sbd / "cls" / f"{image_id}.mat", seg)
    fake.write_image(sbd / "img" / f"{image_id}.jpg",
                     fake.solid(H, W, (10, 240, 10)))
  return root


@pytest.fixture(scope="module")
def default_builder(manual_dir, tmp_path_factory):
  return fake.build(voc.Voc2012Segmentation,
                    tmp_path_factory.mktemp("voc_data"), manual_dir)


def test_default_splits_and_labels(default_builder):
  assert fake.split_sizes(default_builder) == {"train": 2, "validation": 2}
  train = fake.examples(default_builder, "train")
  assert set(train) == {f"{i}.jpg" for i in VOC_TRAIN}
  for ex in train.values():
    assert ex["image"].shape == (H, W, 3) and ex["image"].dtype == np.uint8
    mask = ex["segmentation_mask"]
    assert mask.shape == (H, W, 1) and mask.dtype == np.uint8
    # Palette index 15 stays 15 (not its colour), void stays 255.
    np.testing.assert_array_equal(mask[..., 0], _voc_label())
  colour = train["2007_000032.jpg"]["image"].astype(int)
  assert np.abs(colour - (200, 30, 60)).max() <= 3
  grey = train["2007_000039.jpg"]["image"]  # Converted to 3 equal channels.
  np.testing.assert_array_equal(grey[..., 0], grey[..., 1])
  np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
  assert abs(int(grey[0, 0, 0]) - 90) <= 2


def test_train_aug_set_arithmetic():
  ids = voc.train_aug_ids(VOC_TRAIN, VOC_VAL, SBD_TRAIN, SBD_VAL)
  assert ids == sorted(TRAIN_AUG)
  assert not set(ids) & set(VOC_VAL)


def test_aug_config(manual_dir, tmp_path):
  builder = builders.load_builder("voc2012_segmentation/aug", str(tmp_path),
                                  manual_dir=str(manual_dir))
  assert fake.split_sizes(builder) == {"train": 4, "validation": 2}
  train = fake.examples(builder, "train")
  assert set(train) == {f"{i}.jpg" for i in TRAIN_AUG}  # No VOC val image.
  # VOC's PNG wins over SBD's .mat where both exist.
  np.testing.assert_array_equal(
      train["2007_000032.jpg"]["segmentation_mask"][..., 0], _voc_label())
  sbd_only = train["2008_000002.jpg"]["segmentation_mask"][..., 0]
  assert sbd_only[3, 2] == 7 and sbd_only[0, 0] == 0
  assert set(np.unique(sbd_only)) == {0, 7}
  # 2008_000003's image exists only in SBD's img/ folder.
  assert np.abs(train["2008_000003.jpg"]["image"].astype(int)
                - (10, 240, 10)).max() <= 3
  assert set(fake.examples(builder, "validation")) == {
      f"{i}.jpg" for i in VOC_VAL}


def test_reads_the_tar_in_place(manual_dir, default_builder, tmp_path):
  packed = tmp_path / "manual"
  packed.mkdir()
  with tarfile.open(packed / voc.VOC_ARCHIVE, "w") as tar:
    tar.add(manual_dir / "VOCdevkit", arcname="VOCdevkit")
  builder = fake.build(voc.Voc2012Segmentation, tmp_path / "data", packed)
  from_tar = fake.examples(builder, "validation")
  from_folder = fake.examples(default_builder, "validation")
  assert set(from_tar) == set(from_folder)
  for name, ex in from_tar.items():
    np.testing.assert_array_equal(ex["segmentation_mask"],
                                  from_folder[name]["segmentation_mask"])


def test_missing_download_says_what_and_where(manual_dir, tmp_path):
  empty = tmp_path / "empty"
  with pytest.raises(errors.DataError, match=voc.VOC_ARCHIVE):
    fake.build(voc.Voc2012Segmentation, tmp_path / "a", empty)
  other = tmp_path / "other"
  fake.write_text(other / "notes.txt", ["not VOC"])
  with pytest.raises(errors.DataError) as info:
    fake.build(voc.Voc2012Segmentation, tmp_path / "b", other)
  message = str(info.value)
  assert "Cannot find PASCAL VOC 2012" in message
  assert str(other / "VOCdevkit" / "VOC2012") in message
  assert voc.VOC_ARCHIVE in message
  # VOC present, SBD missing: only the aug config needs it.
  voc_only = tmp_path / "voc_only"
  shutil.copytree(manual_dir / "VOCdevkit", voc_only / "VOCdevkit")
  with pytest.raises(errors.DataError, match="benchmark_RELEASE"):
    fake.build(voc.Voc2012Segmentation, tmp_path / "c", voc_only, config="aug")


def test_bad_examples_fail_or_are_skipped(manual_dir, tmp_path, caplog):
  broken = tmp_path / "broken"
  shutil.copytree(manual_dir / "VOCdevkit", broken / "VOCdevkit")
  corrupt = broken / "VOCdevkit/VOC2012/JPEGImages/2007_000039.jpg"
  corrupt.write_bytes(corrupt.read_bytes()[:40])  # Truncated.
  with pytest.raises(errors.DataError, match="2007_000039.jpg"):
    fake.build(voc.Voc2012Segmentation, tmp_path / "a", broken)
  with caplog.at_level(logging.WARNING):
    builder = fake.build(voc.Voc2012Segmentation, tmp_path / "b", broken,
                         skip_bad_examples=True)
  assert fake.split_sizes(builder) == {"train": 1, "validation": 2}
  assert "skipped 1 bad example" in caplog.text
  assert "2007_000039.jpg" in caplog.text
