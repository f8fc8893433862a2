"""`cityscapes`: Cityscapes fine annotations, 19 training classes.

Reads the manual download (nothing is fetched at build time), zips as
downloaded or extracted:

  <manual_dir>/leftImg8bit_trainvaltest.zip   or  <manual_dir>/leftImg8bit/
      leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  <manual_dir>/gtFine_trainvaltest.zip        or  <manual_dir>/gtFine/
      gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

Labels: the `*_gtFine_labelIds.png` ids (0..33) are mapped to the 19
training ids of cityscapesScripts' `labels.py` (`LABELS` below); the other
ids (unlabeled, ego vehicle, parking, rail track, guard rail, bridge,
tunnel, polegroup, caravan, trailer, ...) become 255. The test split's
annotations are withheld by the benchmark, so its masks are all 255 and its
gtFine files are not read.

Splits: train 2,975 / validation 500 / test 1,525.

Features:
  image:             uint8 [1024, 2048, 3] (stored as the original PNG)
  segmentation_mask: uint8 [H, W, 1]; 0..18 train ids, 255 ignore
  file_name:         e.g. "aachen_000000_000019_leftImg8bit.png"

The tfds name is `segjax_cityscapes`, so that it never collides with tfds's
own `cityscapes` builder; segjax's registry calls it "cityscapes".
"""
import functools

import numpy as np
import tensorflow_datasets as tfds

from segjax.data.builders import manual, sources

# cityscapesScripts labels.py: (name, labelId, trainId, RGB colour).
LABELS = (
    ("unlabeled", 0, 255, (0, 0, 0)),
    ("ego vehicle", 1, 255, (0, 0, 0)),
    ("rectification border", 2, 255, (0, 0, 0)),
    ("out of roi", 3, 255, (0, 0, 0)),
    ("static", 4, 255, (0, 0, 0)),
    ("dynamic", 5, 255, (111, 74, 0)),
    ("ground", 6, 255, (81, 0, 81)),
    ("road", 7, 0, (128, 64, 128)),
    ("sidewalk", 8, 1, (244, 35, 232)),
    ("parking", 9, 255, (250, 170, 160)),
    ("rail track", 10, 255, (230, 150, 140)),
    ("building", 11, 2, (70, 70, 70)),
    ("wall", 12, 3, (102, 102, 156)),
    ("fence", 13, 4, (190, 153, 153)),
    ("guard rail", 14, 255, (180, 165, 180)),
    ("bridge", 15, 255, (150, 100, 100)),
    ("tunnel", 16, 255, (150, 120, 90)),
    ("pole", 17, 5, (153, 153, 153)),
    ("polegroup", 18, 255, (153, 153, 153)),
    ("traffic light", 19, 6, (250, 170, 30)),
    ("traffic sign", 20, 7, (220, 220, 0)),
    ("vegetation", 21, 8, (107, 142, 35)),
    ("terrain", 22, 9, (152, 251, 152)),
    ("sky", 23, 10, (70, 130, 180)),
    ("person", 24, 11, (220, 20, 60)),
    ("rider", 25, 12, (255, 0, 0)),
    ("car", 26, 13, (0, 0, 142)),
    ("truck", 27, 14, (0, 0, 70)),
    ("bus", 28, 15, (0, 60, 100)),
    ("caravan", 29, 255, (0, 0, 90)),
    ("trailer", 30, 255, (0, 0, 110)),
    ("train", 31, 16, (0, 80, 100)),
    ("motorcycle", 32, 17, (0, 0, 230)),
    ("bicycle", 33, 18, (119, 11, 32)),
)
_TRAIN = sorted((t, name, colour) for name, _, t, colour in LABELS if t != 255)
CLASS_NAMES = tuple(name for _, name, _ in _TRAIN)
PALETTE = np.array([colour for _, _, colour in _TRAIN], np.uint8)
SPLITS = {"train": "train", "validation": "val", "test": "test"}
SPLIT_SIZES = {"train": 2975, "validation": 500, "test": 1525}
IMAGES_ARCHIVE = "leftImg8bit_trainvaltest.zip"
LABELS_ARCHIVE = "gtFine_trainvaltest.zip"

# Ids beyond the table (e.g. the license plate's -1, written as 255 in an
# 8-bit PNG) are not training classes either: 255, not an error.
_TABLE = manual.lookup_table([(i, t) for _, i, t, _ in LABELS], default=255)
_IMAGE_SUFFIX, _LABEL_SUFFIX = "_leftImg8bit.png", "_gtFine_labelIds.png"
# Roots of leftImg8bit/ and gtFine/: extracted, extracted into a folder named
# after the zip, or the zip itself.
_IMAGE_PLACES = [
    sources.Candidate("leftImg8bit"),
    sources.Candidate("leftImg8bit_trainvaltest/leftImg8bit"),
    sources.Candidate(IMAGES_ARCHIVE, inner="leftImg8bit"),
]
_LABEL_PLACES = [
    sources.Candidate("gtFine"),
    sources.Candidate("gtFine_trainvaltest/gtFine"),
    sources.Candidate(LABELS_ARCHIVE, inner="gtFine"),
]

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Log in at https://www.cityscapes-dataset.com/downloads/ and download
{IMAGES_ARCHIVE} (11 GB) and {LABELS_ARCHIVE} (241 MB). Put both in
<manual_dir>/, as they are or extracted there (giving <manual_dir>/leftImg8bit/
and <manual_dir>/gtFine/).
""" + manual.MANUAL_DIR_NOTE


class Cityscapes(manual.ManualBuilder):
  """Cityscapes gtFine semantic segmentation, 19 train ids."""

  name = "segjax_cityscapes"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__.split("\n\n")[0],
        features=manual.semantic_features("png"),
        supervised_keys=("image", "segmentation_mask"),
        homepage="https://www.cityscapes-dataset.com/",
    )

  def _split_generators(self, dl_manager):
    manual_dir = self.manual_dir(dl_manager)
    images = sources.locate(
        manual_dir, "the Cityscapes images (leftImg8bit)", _IMAGE_PLACES,
        MANUAL_DOWNLOAD_INSTRUCTIONS, required=("train", "val"))
    labels = sources.locate(
        manual_dir, "the Cityscapes fine annotations (gtFine)", _LABEL_PLACES,
        MANUAL_DOWNLOAD_INSTRUCTIONS, required=("train", "val"))
    generators = {}
    for split, folder in SPLITS.items():
      files = images.files(folder, _IMAGE_SUFFIX)
      self.check_count(split, len(files), SPLIT_SIZES[split])
      make = functools.partial(_example, images,
                               None if folder == "test" else labels)
      generators[split] = self._examples(split, ((f, f) for f in files), make,
                                         where=images.where(folder))
    return generators


def label_path(image_path: str) -> str:
  """<split>/<city>/<stem>_gtFine_labelIds.png (under gtFine/) of an image's
  <split>/<city>/<stem>_leftImg8bit.png (under leftImg8bit/)."""
  return image_path[:-len(_IMAGE_SUFFIX)] + _LABEL_SUFFIX


def _example(images, labels, path: str) -> dict:
  image, (h, w) = manual.rgb_image(manual.read(images, path),
                                   images.where(path))
  if labels is None:  # Test split: annotations are withheld.
    mask = np.full((h, w), manual.IGNORE, np.uint8)
  else:
    gt = label_path(path)
    where = labels.where(gt)
    ids = manual.label_map(manual.read(labels, gt), where)
    manual.check_size(ids, (h, w), where)
    mask = manual.remap(ids, _TABLE, where)
  return {"image": image, "segmentation_mask": manual.png_bytes(mask),
          "file_name": path.rpartition("/")[2]}
