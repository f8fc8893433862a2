"""pascal_context on fake VOC2010 images + a trainval_merged.json in the
PASCAL in Detail format (compressed-RLE and polygon segmentations)."""
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

import fake_downloads as fake
from segjax import errors
from segjax.data import builders
from segjax.data.builders import pascal_context as pc

H, W = 6, 8
PERSON, SKY, ACCORDION = 284, 360, 1  # 459-label ids; accordion is not in 59.
IMAGES = [("2008_000002", "train"), ("2008_000003", "train"),
          ("2008_000007", "val"), ("2008_000009", "val")]


def _rle(mask):
  """Compressed RLE as the json stores it: counts as a string."""
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _detail_json():
  sky = np.zeros((H, W), bool)
  sky[:3] = True
  accordion = np.zeros((H, W), bool)
  accordion[5, 5:] = True
  images, annotations = [], []
  for k, (stem, phase) in enumerate(IMAGES):
    image_id = int(stem.replace("_", ""))
    images.append({"image_id": image_id, "file_name": f"{stem}.jpg",
                   "height": H, "width": W, "phase": phase,
                   "date_captured": "31-May-2015 17:44:04"})
    annotations += [
        {"id": 10 * k + 1, "image_id": image_id, "category_id": SKY,
         "segmentation": _rle(sky), "area": int(sky.sum()),
         "bbox": [0, 0, W, 3], "iscrowd": 0, "parts": []},
        # A person polygon over the sky's lower rows: painted later, wins.
        {"id": 10 * k + 2, "image_id": image_id, "category_id": PERSON,
         "segmentation": [[2, 2, 6, 2, 6, 5, 2, 5]], "area": 12,
         "bbox": [2, 2, 4, 3], "iscrowd": 0, "parts": []},
        {"id": 10 * k + 3, "image_id": image_id, "category_id": ACCORDION,
         "segmentation": _rle(accordion), "area": 3, "bbox": [5, 5, 3, 1],
         "iscrowd": 0, "parts": []},
    ]
  categories = [{"category_id": i + 1, "name": name, "supercategory": "object",
                 "onlysemantic": 0, "parts": []}
                for i, name in enumerate(pc.FULL_NAMES)]
  return {"info": {"description": "fake"}, "images": images,
          "annos_segmentation": annotations, "categories": categories,
          "parts": [], "annos_occlusion": [], "annos_boundary": [],
          "annos_joints": []}


def _expected(config):
  """Expected label map: sky rows 0-2, person box, accordion, unlabelled."""
  person = mask_utils.decode(mask_utils.frPyObjects(
      [[2, 2, 6, 2, 6, 5, 2, 5]], H, W))[..., 0].astype(bool)
  ids = np.zeros((H, W), np.int64)
  ids[:3] = SKY
  ids[person] = PERSON
  ids[5, 5:] = ACCORDION
  table = {"59": {SKY: 46, PERSON: 36, ACCORDION: 255, 0: 255},
           "60": {SKY: 47, PERSON: 37, ACCORDION: 0, 0: 0},
           "full": {SKY: 359, PERSON: 283, ACCORDION: 0, 0: 255}}[config]
  return np.vectorize(table.get)(ids).astype(np.uint8)


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("context_manual")
  for stem, _ in IMAGES:
    fake.write_image(root / "VOCdevkit/VOC2010/JPEGImages" / f"{stem}.jpg",
                     fake.solid(H, W, (90, 120, 30)))
  with open(root / pc.JSON_NAME, "w") as f:
    json.dump(_detail_json(), f)
  return root


@pytest.mark.parametrize("config", ["59", "60", "full"])
def test_label_mappings(manual_dir, tmp_path, config):
  builder = builders.load_builder(f"pascal_context/{config}", str(tmp_path),
                                  manual_dir=str(manual_dir))
  assert fake.split_sizes(builder) == {"train": 2, "validation": 2}
  val = fake.examples(builder, "validation")
  assert set(val) == {"2008_000007.jpg", "2008_000009.jpg"}
  expected = _expected(config)
  assert expected[0, 0] != expected[3, 3]  # Sky and person both present.
  for ex in val.values():
    assert ex["image"].shape == (H, W, 3)
    np.testing.assert_array_equal(ex["segmentation_mask"][..., 0], expected)


def test_class_names():
  assert len(pc.FULL_NAMES) == 459 and len(pc.CLASS_NAMES_59) == 59
  assert pc.CLASS_NAMES_59[36] == "person" and pc.CLASS_NAMES_59[46] == "sky"
  # mmseg's PascalContextDataset59 order: the 59 ids sorted.
  assert pc.CLASS_NAMES_59[:4] == ("aeroplane", "bag", "bed", "bedclothes")
  assert pc.CLASS_NAMES_59[-3:] == ("water", "window", "wood")
  assert builders.dataset_info("pascal_context/59")["num_classes"] == 59
  assert builders.dataset_info("pascal_context/60")["class_names"][0] == (
      "background")
  assert builders.dataset_info("pascal_context/full")["num_classes"] == 459


def test_missing_json(manual_dir, tmp_path):
  images_only = tmp_path / "images_only"
  fake.write_image(images_only / "VOCdevkit/VOC2010/JPEGImages/x.jpg",
                   fake.solid(H, W, (0, 0, 0)))
  with pytest.raises(errors.DataError) as info:
    fake.build(pc.PascalContext, tmp_path / "data", images_only, config="59")
  message = str(info.value)
  assert str(images_only / pc.JSON_NAME) in message
  assert "codalabuser" in message  # Where to get it.
