"""`voc2012_segmentation`: PASCAL VOC 2012 semantic segmentation (+ SBD).

Reads the manual download (nothing is fetched at build time):

  <manual_dir>/VOCtrainval_11-May-2012.tar      as downloaded, or extracted:
  <manual_dir>/VOCdevkit/VOC2012/{JPEGImages, SegmentationClass,
                                  ImageSets/Segmentation/{train,val}.txt}
  <manual_dir>/benchmark_RELEASE/dataset/{cls/*.mat, img/*.jpg,
                                          train.txt, val.txt}
      (config "aug" only: SBD's benchmark.tgz, extracted)

Labels are the palette indices of VOC's SegmentationClass PNGs, read as
indices (not colours): 0 background, 1..20 the classes of `CLASS_NAMES`,
255 void (object borders and difficult regions), kept as the ignore id.
SBD's labels are `GTcls.Segmentation` of its MATLAB files (0..20, no void).

Configs:
  "default": train 1,464 / validation 1,449 (VOC's own split lists).
  "aug":     train = the 10,582-image "train_aug" set
             (SBD train ∪ SBD val ∪ VOC train) − VOC val, labelled by VOC's
             PNG where VOC has one and by SBD's .mat otherwise;
             validation = VOC val (1,449). Its train split is named "train"
             so that the trainer, which reads "train", uses it unchanged.

Features:
  image:             uint8 [H, W, 3], variable size (about 500x375)
  segmentation_mask: uint8 [H, W, 1]; 0..20 classes, 255 void
  file_name:         e.g. "2007_000032.jpg"
"""
import dataclasses
import functools
import io

import numpy as np
import scipy.io
import tensorflow_datasets as tfds

from segjax.data.builders import manual, sources

CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus",
    "car", "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike",
    "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
SPLIT_SIZES = {
    "default": {"train": 1464, "validation": 1449},
    "aug": {"train": 10582, "validation": 1449},
}
VOC_ARCHIVE = "VOCtrainval_11-May-2012.tar"
SBD_ARCHIVE = "benchmark.tgz"

_VOC_PLACES = [
    sources.Candidate("VOCdevkit/VOC2012"),
    sources.Candidate("VOCtrainval_11-May-2012/VOCdevkit/VOC2012"),
    sources.Candidate(VOC_ARCHIVE, inner="VOCdevkit/VOC2012"),
]
_SBD_PLACES = [
    sources.Candidate("benchmark_RELEASE/dataset"),
    sources.Candidate("benchmark/benchmark_RELEASE/dataset"),
]
_LISTS = "ImageSets/Segmentation"
# 0..20 are classes and 255 is void; any other index means a wrong file.
_TABLE = manual.lookup_table([(i, i) for i in range(21)] + [(255, 255)])

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download {VOC_ARCHIVE} (1.9 GB) from
http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ and put it in <manual_dir>/,
as is or extracted (<manual_dir>/VOCdevkit/VOC2012/).
For the "aug" config also download SBD's {SBD_ARCHIVE} (1.4 GB) from
https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz
and extract it in <manual_dir>/ (tar xzf {SBD_ARCHIVE} -C <manual_dir>), giving
<manual_dir>/benchmark_RELEASE/dataset/cls/*.mat; a .tgz cannot be read in place.
""" + manual.MANUAL_DIR_NOTE


@dataclasses.dataclass(eq=False)
class VocConfig(tfds.core.BuilderConfig):
  """Attributes: use_sbd: train on train_aug (VOC + SBD) instead of VOC train."""
  use_sbd: bool = False


class Voc2012Segmentation(manual.ManualBuilder):
  """PASCAL VOC 2012 semantic segmentation, optionally with SBD (train_aug)."""

  name = "voc2012_segmentation"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [
      VocConfig(name="default", description="VOC 2012: train 1,464, "
                "validation 1,449."),
      VocConfig(name="aug", use_sbd=True, description="train_aug (VOC + "
                "SBD): train 10,582, validation 1,449 (VOC val)."),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__.split("\n\n")[0],
        features=manual.semantic_features("jpeg"),
        supervised_keys=("image", "segmentation_mask"),
        homepage="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/",
    )

  def _split_generators(self, dl_manager):
    manual_dir = self.manual_dir(dl_manager)
    voc = sources.locate(
        manual_dir, "PASCAL VOC 2012 (trainval)", _VOC_PLACES,
        MANUAL_DOWNLOAD_INSTRUCTIONS,
        required=(f"{_LISTS}/train.txt", f"{_LISTS}/val.txt", "JPEGImages",
                  "SegmentationClass"))
    train = _ids(voc, f"{_LISTS}/train.txt")
    val = _ids(voc, f"{_LISTS}/val.txt")
    sbd = None
    if self.builder_config.use_sbd:
      sbd = sources.locate(
          manual_dir, "SBD (benchmark_RELEASE, extracted from benchmark.tgz)",
          _SBD_PLACES, MANUAL_DOWNLOAD_INSTRUCTIONS,
          required=("train.txt", "val.txt", "cls"))
      train = train_aug_ids(train, val, _ids(sbd, "train.txt"),
                            _ids(sbd, "val.txt"))
    sizes = SPLIT_SIZES[self.builder_config.name]
    splits = {"train": train, "validation": val}
    for split, ids in splits.items():
      self.check_count(split, len(ids), sizes.get(split))
    return {
        split: self._examples(split, ((i, i) for i in ids),
                              functools.partial(_example, voc, sbd),
                              where=f"the {split} list")
        for split, ids in splits.items()
    }


def train_aug_ids(voc_train, voc_val, sbd_train, sbd_val) -> list[str]:
  """(SBD train ∪ SBD val ∪ VOC train) − VOC val, sorted: 10,582 ids."""
  return sorted((set(sbd_train) | set(sbd_val) | set(voc_train))
                - set(voc_val))


def _ids(source, path) -> list[str]:
  text = sources.require_file(source, path, "a split list",
                              MANUAL_DOWNLOAD_INSTRUCTIONS)
  return [line.strip() for line in text.decode().splitlines() if line.strip()]


def _example(voc, sbd, image_id: str) -> dict:
  """One example; VOC's files first, SBD's where VOC has none."""
  jpeg, png = f"JPEGImages/{image_id}.jpg", f"SegmentationClass/{image_id}.png"
  if voc.exists(jpeg) or sbd is None:
    image_where, data = voc.where(jpeg), manual.read(voc, jpeg)
  else:
    image_where, data = sbd.where(f"img/{image_id}.jpg"), manual.read(
        sbd, f"img/{image_id}.jpg")
  image, size = manual.rgb_image(data, image_where)
  if voc.exists(png) or sbd is None:
    where = voc.where(png)
    ids = manual.label_map(manual.read(voc, png), where)
  else:
    where = sbd.where(f"cls/{image_id}.mat")
    ids = sbd_label(manual.read(sbd, f"cls/{image_id}.mat"), where)
  manual.check_size(ids, size, where)
  mask = manual.remap(ids, _TABLE, where)
  return {"image": image, "segmentation_mask": manual.png_bytes(mask),
          "file_name": f"{image_id}.jpg"}


def sbd_label(data: bytes, where: str) -> np.ndarray:
  """int [H, W] class ids of an SBD `cls/<id>.mat` (struct GTcls)."""
  try:
    mat = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True,
                           struct_as_record=False)
    return np.asarray(mat["GTcls"].Segmentation).astype(np.int64)
  except (ValueError, KeyError, AttributeError, TypeError, OSError,
          NotImplementedError) as e:
    raise manual.BadExample(
        f"cannot read GTcls.Segmentation from {where}: {e}") from e
