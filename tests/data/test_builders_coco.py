"""coco_instances on fake COCO 2017 folders/zips, instance jsons and
COCO-Stuff label maps."""
import json
import os
import zipfile

import numpy as np
import pytest
from pycocotools import mask as mask_utils

import fake_downloads as fake
from segjax import errors
from segjax.data import builders
from segjax.data.builders import coco

H, W = 8, 10
POLYGON = [[1, 1, 5, 1, 5, 5, 1, 5]]  # Covers rows 1..4, columns 1..4.
TRAIN = {139: "000000000139.jpg", 285: "000000000285.jpg",
         632: "000000000632.jpg"}
VAL = {724: "000000000724.jpg", 776: "000000000776.jpg"}


def _uncompressed_rle(mask):
  """COCO json's crowd format: column-major run lengths, zeros first."""
  flat = mask.astype(np.uint8).ravel(order="F")
  changes = np.flatnonzero(np.diff(flat)) + 1
  runs = np.diff(np.concatenate([[0], changes, [flat.size]]))
  counts = runs.tolist() if flat[0] == 0 else [0] + runs.tolist()
  return {"size": [H, W], "counts": counts}


def _car_mask():
  mask = np.zeros((H, W), bool)
  mask[5:8, 6:9] = True
  return mask


def _crowd_mask():
  mask = np.zeros((H, W), bool)
  mask[0:2, 7:10] = True
  return mask


def _instances_json(images):
  """images: {id: file_name}; 139 gets a polygon, an RLE and a crowd
  instance, 285 none (a grey image), every other image one toothbrush."""
  records, annotations = [], []
  for image_id, name in images.items():
    records.append({"id": image_id, "file_name": name, "height": H,
                    "width": W, "license": 1, "coco_url": "",
                    "date_captured": "2013-11-14 16:28:13", "flickr_url": ""})
    if image_id == 139:
      annotations += [
          {"id": 1, "image_id": 139, "category_id": 1, "iscrowd": 0,
           "segmentation": POLYGON, "area": 16.0, "bbox": [1, 1, 4, 4]},
          {"id": 2, "image_id": 139, "category_id": 3, "iscrowd": 0,
           "segmentation": _uncompressed_rle(_car_mask()), "area": 9.0,
           "bbox": [6, 5, 3, 3]},
          {"id": 3, "image_id": 139, "category_id": 1, "iscrowd": 1,
           "segmentation": _uncompressed_rle(_crowd_mask()), "area": 6.0,
           "bbox": [7, 0, 3, 2]},
      ]
    elif image_id != 285:
      annotations.append(
          {"id": 100 + image_id, "image_id": image_id, "category_id": 90,
           "iscrowd": 0, "segmentation": [[0, 0, 3, 0, 3, 3, 0, 3]],
           "area": 9.0, "bbox": [0.5, 0.25, 2.5, 2.75]})
  return {"info": {}, "licenses": [], "images": records,
          "annotations": annotations,
          "categories": [{"id": i, "name": n, "supercategory": ""}
                         for i, n in coco.CATEGORIES]}


def _stuff_map():
  """0-based stuffthingmaps values: person 0, car 2, an unused id (11),
  banner 91, wood 181, unlabelled 255."""
  ids = np.zeros((H, W), np.uint8)
  ids[1] = 2
  ids[2] = 11
  ids[3] = 91
  ids[4] = 181
  ids[5] = 255
  return ids


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory):
  """train2017/ extracted, val2017.zip and the annotations zip as
  downloaded, stuff maps extracted."""
  root = tmp_path_factory.mktemp("coco_manual")
  for image_id, name in TRAIN.items():
    image = (np.full((H, W), 128, np.uint8) if image_id == 285
             else fake.solid(H, W, (250, 200, 10)))
    fake.write_image(root / "train2017" / name, image)
  with zipfile.ZipFile(root / "val2017.zip", "w") as z:
    for name in VAL.values():
      z.writestr(f"val2017/{name}",
                 fake.image_bytes(fake.solid(H, W, (5, 5, 250)), "JPEG"))
  with zipfile.ZipFile(root / coco.ANNOTATIONS_ARCHIVE, "w") as z:
    z.writestr("annotations/instances_train2017.json",
               json.dumps(_instances_json(TRAIN)))
    z.writestr("annotations/instances_val2017.json",
               json.dumps(_instances_json(VAL)))
    z.writestr("annotations/captions_train2017.json", "{}")
  for folder, images in (("train2017", TRAIN), ("val2017", VAL)):
    for name in images.values():
      fake.write_grey_png(root / "stuffthingmaps_trainval2017" / folder
                          / name.replace(".jpg", ".png"), _stuff_map())
  return root


@pytest.fixture(scope="module")
def instances(manual_dir, tmp_path_factory):
  return fake.build(coco.CocoInstances, tmp_path_factory.mktemp("coco"),
                    manual_dir)


def test_instances(instances):
  assert fake.split_sizes(instances) == {"train": 3, "validation": 2}
  train = fake.examples(instances, "train")
  assert set(train) == set(TRAIN.values())
  ex = train["000000000139.jpg"]
  assert ex["image_id"] == 139 and ex["image"].shape == (H, W, 3)
  objects = ex["objects"]
  assert objects["mask"].shape == (3, H, W, 1)
  assert objects["mask"].dtype == np.uint8
  np.testing.assert_array_equal(objects["label"], [0, 2, 0])  # person, car
  np.testing.assert_array_equal(objects["is_crowd"], [False, False, True])
  np.testing.assert_array_equal(
      objects["bbox"], [[1, 1, 5, 5], [6, 5, 9, 8], [7, 0, 10, 2]])
  assert objects["bbox"].dtype == np.float32
  polygon = objects["mask"][0, ..., 0]
  assert polygon[2, 2] == 1 and polygon[1, 1] == 1 and polygon[4, 4] == 1
  assert polygon[0, 0] == 0 and polygon[5, 5] == 0 and polygon[2, 7] == 0
  expected = mask_utils.decode(mask_utils.frPyObjects(POLYGON, H, W))[..., 0]
  np.testing.assert_array_equal(polygon, expected)
  np.testing.assert_array_equal(objects["mask"][1, ..., 0], _car_mask())
  np.testing.assert_array_equal(objects["mask"][2, ..., 0], _crowd_mask())


def test_image_without_annotations_and_grey(instances):
  ex = fake.examples(instances, "train")["000000000285.jpg"]
  assert len(ex["objects"]["label"]) == 0
  assert ex["objects"]["bbox"].shape == (0, 4)
  image = ex["image"]
  assert image.shape == (H, W, 3)
  np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_validation_from_zips(instances):
  val = fake.examples(instances, "validation")
  assert {int(ex["image_id"]) for ex in val.values()} == set(VAL)
  for ex in val.values():
    np.testing.assert_array_equal(ex["objects"]["label"], [79])  # toothbrush
    np.testing.assert_allclose(ex["objects"]["bbox"], [[0.5, 0.25, 3, 3]])


def test_stuff_config(manual_dir, tmp_path):
  builder = builders.load_builder("coco_instances/stuff", str(tmp_path),
                                  manual_dir=str(manual_dir))
  assert fake.split_sizes(builder) == {"train": 3, "validation": 2}
  expected = np.zeros((H, W), np.uint8)  # person: 0 -> 0
  expected[1] = 2      # car: 2 -> 2
  expected[2] = 255    # 11 (COCO id 12, never used) -> ignore
  expected[3] = 80     # banner: 91 -> 80
  expected[4] = 170    # wood: 181 -> 170
  expected[5] = 255    # unlabelled
  for ex in fake.examples(builder, "validation").values():
    np.testing.assert_array_equal(ex["segmentation_mask"][..., 0], expected)
  names = builders.dataset_info("coco_instances/stuff")["class_names"]
  assert (len(names), names[2], names[80], names[170]) == (
      171, "car", "banner", "wood")


def test_missing_annotations(manual_dir, tmp_path):
  partial = tmp_path / "partial"
  partial.mkdir()
  os.symlink(manual_dir / "train2017", partial / "train2017")
  with pytest.raises(errors.DataError) as info:
    fake.build(coco.CocoInstances, tmp_path / "data", partial)
  message = str(info.value)
  assert "COCO 2017 annotations" in message
  assert str(partial / coco.ANNOTATIONS_ARCHIVE) in message
  assert str(partial / "annotations") in message


def test_dataset_info():
  info = builders.dataset_info("coco_instances")
  assert info["num_classes"] == 80 and info["label_key"] == "objects"
  assert len(set(coco.CATEGORY_IDS)) == 80 and coco.CATEGORY_IDS[-1] == 90
