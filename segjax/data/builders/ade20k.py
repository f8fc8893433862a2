"""`ade20k`: ADE20K SceneParsing (ADEChallengeData2016), 150 classes.

Reads the manual download (nothing is fetched at build time), the zip as
downloaded or extracted:

  <manual_dir>/ADEChallengeData2016.zip  or  <manual_dir>/ADEChallengeData2016/
      images/{training,validation}/ADE_*_XXXXXXXX.jpg
      annotations/{training,validation}/ADE_*_XXXXXXXX.png

Labels: the annotation PNGs hold 0 ("other", not one of the 150 classes)
and 1..150 (objectInfo150.txt). As in the benchmark (and mmseg's
reduce_zero_label), 0 becomes 255 (ignore) and k becomes k - 1, so
`CLASS_NAMES[k - 1]` is objectInfo150's class k.

Splits: train 20,210 / validation 2,000.

Features:
  image:             uint8 [H, W, 3], variable size (shorter side ~512)
  segmentation_mask: uint8 [H, W, 1]; 0..149, 255 ignore
  file_name:         e.g. "ADE_train_00000001.jpg"
"""
import functools

import numpy as np
import tensorflow_datasets as tfds

from segjax.data.builders import manual, sources

# objectInfo150.txt's first names, in id order (as mmseg lists them).
CLASS_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed",
    "windowpane", "grass", "cabinet", "sidewalk", "person", "earth", "door",
    "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp",
    "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill",
    "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel",
    "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy",
    "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food",
    "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle",
    "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce",
    "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag")
# mmseg's ADE20K palette (the colours of the benchmark's visualisations).
PALETTE = np.array([
    [120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50],
    [4, 200, 3], [120, 120, 80], [140, 140, 140], [204, 5, 255],
    [230, 230, 230], [4, 250, 7], [224, 5, 255], [235, 255, 7],
    [150, 5, 61], [120, 120, 70], [8, 255, 51], [255, 6, 82],
    [143, 255, 140], [204, 255, 4], [255, 51, 7], [204, 70, 3],
    [0, 102, 200], [61, 230, 250], [255, 6, 51], [11, 102, 255],
    [255, 7, 71], [255, 9, 224], [9, 7, 230], [220, 220, 220],
    [255, 9, 92], [112, 9, 255], [8, 255, 214], [7, 255, 224],
    [255, 184, 6], [10, 255, 71], [255, 41, 10], [7, 255, 255],
    [224, 255, 8], [102, 8, 255], [255, 61, 6], [255, 194, 7],
    [255, 122, 8], [0, 255, 20], [255, 8, 41], [255, 5, 153],
    [6, 51, 255], [235, 12, 255], [160, 150, 20], [0, 163, 255],
    [140, 140, 140], [250, 10, 15], [20, 255, 0], [31, 255, 0],
    [255, 31, 0], [255, 224, 0], [153, 255, 0], [0, 0, 255],
    [255, 71, 0], [0, 235, 255], [0, 173, 255], [31, 0, 255],
    [11, 200, 200], [255, 82, 0], [0, 255, 245], [0, 61, 255],
    [0, 255, 112], [0, 255, 133], [255, 0, 0], [255, 163, 0],
    [255, 102, 0], [194, 255, 0], [0, 143, 255], [51, 255, 0],
    [0, 82, 255], [0, 255, 41], [0, 255, 173], [10, 0, 255],
    [173, 255, 0], [0, 255, 153], [255, 92, 0], [255, 0, 255],
    [255, 0, 245], [255, 0, 102], [255, 173, 0], [255, 0, 20],
    [255, 184, 184], [0, 31, 255], [0, 255, 61], [0, 71, 255],
    [255, 0, 204], [0, 255, 194], [0, 255, 82], [0, 10, 255],
    [0, 112, 255], [51, 0, 255], [0, 194, 255], [0, 122, 255],
    [0, 255, 163], [255, 153, 0], [0, 255, 10], [255, 112, 0],
    [143, 255, 0], [82, 0, 255], [163, 255, 0], [255, 235, 0],
    [8, 184, 170], [133, 0, 255], [0, 255, 92], [184, 0, 255],
    [255, 0, 31], [0, 184, 255], [0, 214, 255], [255, 0, 112],
    [92, 255, 0], [0, 224, 255], [112, 224, 255], [70, 184, 160],
    [163, 0, 255], [153, 0, 255], [71, 255, 0], [255, 0, 163],
    [255, 204, 0], [255, 0, 143], [0, 255, 235], [133, 255, 0],
    [255, 0, 235], [245, 0, 255], [255, 0, 122], [255, 245, 0],
    [10, 190, 212], [214, 255, 0], [0, 204, 255], [20, 0, 255],
    [255, 255, 0], [0, 153, 255], [0, 41, 255], [0, 255, 204],
    [41, 0, 255], [41, 255, 0], [173, 0, 255], [0, 245, 255],
    [71, 0, 255], [122, 0, 255], [0, 255, 184], [0, 92, 255],
    [184, 255, 0], [0, 133, 255], [255, 214, 0], [25, 194, 194],
    [102, 255, 0], [92, 0, 255]], np.uint8)
SPLITS = {"train": "training", "validation": "validation"}
SPLIT_SIZES = {"train": 20210, "validation": 2000}
ARCHIVE = "ADEChallengeData2016.zip"

_PLACES = [
    sources.Candidate("ADEChallengeData2016"),
    sources.Candidate(ARCHIVE, inner="ADEChallengeData2016"),
]
# Reduce-zero-label: 0 ("other") -> 255, k -> k - 1; ids > 150 do not exist.
_TABLE = manual.lookup_table([(0, 255)] + [(k, k - 1) for k in range(1, 151)])

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download {ARCHIVE} (923 MB) from
http://data.csail.mit.edu/places/ADEchallenge/{ARCHIVE} (the MIT Scene
Parsing benchmark, http://sceneparsing.csail.mit.edu/) and put it in
<manual_dir>/, as is or extracted (<manual_dir>/ADEChallengeData2016/).
""" + manual.MANUAL_DIR_NOTE


class Ade20k(manual.ManualBuilder):
  """ADE20K SceneParsing: 150 classes, 0 ("other") ignored."""

  name = "ade20k"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__.split("\n\n")[0],
        features=manual.semantic_features("jpeg"),
        supervised_keys=("image", "segmentation_mask"),
        homepage="http://sceneparsing.csail.mit.edu/",
    )

  def _split_generators(self, dl_manager):
    source = sources.locate(
        self.manual_dir(dl_manager), "ADE20K (ADEChallengeData2016)",
        _PLACES, MANUAL_DOWNLOAD_INSTRUCTIONS,
        required=("images/training", "annotations/training",
                  "images/validation", "annotations/validation"))
    generators = {}
    for split, folder in SPLITS.items():
      images = source.files(f"images/{folder}", ".jpg")
      self.check_count(split, len(images), SPLIT_SIZES[split])
      generators[split] = self._examples(
          split, ((p, p) for p in images), functools.partial(_example, source),
          where=source.where(f"images/{folder}"))
    return generators


def _example(source, path: str) -> dict:
  """images/<folder>/<stem>.jpg and annotations/<folder>/<stem>.png."""
  image, size = manual.rgb_image(manual.read(source, path), source.where(path))
  label = "annotations/" + path[len("images/"):-len(".jpg")] + ".png"
  where = source.where(label)
  ids = manual.label_map(manual.read(source, label), where)
  manual.check_size(ids, size, where)
  return {"image": image,
          "segmentation_mask": manual.png_bytes(manual.remap(ids, _TABLE, where)),
          "file_name": path.rpartition("/")[2]}
