"""`coco_instances`: COCO 2017 instances and COCO-Stuff 164k.

Reads the manual download (nothing is fetched at build time); every zip may
be left as downloaded or extracted in place:

  <manual_dir>/train2017.zip, val2017.zip       or  <manual_dir>/{train,val}2017/*.jpg
  <manual_dir>/annotations_trainval2017.zip     or  <manual_dir>/annotations/
      annotations/instances_{train,val}2017.json
  <manual_dir>/stuffthingmaps_trainval2017.zip  or  <manual_dir>/stuffthingmaps_trainval2017/
      {train,val}2017/*.png                     (config "stuff" only)

Config "instances" (default): one example per image of the json (images
without annotations included), with every annotation of the image, in file
order:

  image:     uint8 [H, W, 3] (grey JPEGs converted to RGB)
  image_id:  int64, COCO's image id
  file_name: e.g. "000000000139.jpg"
  objects:   a sequence of K instances, as segjax_shapes' `objects`:
    mask:     uint8 [K, H, W, 1], 1 inside the instance; decoded from the
              polygons or RLE with pycocotools, as COCO's evaluation does
    bbox:     float32 [K, 4] (x1, y1, x2, y2) pixels = COCO's (x, y, x + w,
              y + h)
    label:    int64 [K] in 0..79, COCO's 80 category ids made contiguous
              (`CATEGORY_IDS[label]` is the COCO id, `CLASS_NAMES[label]`
              its name)
    is_crowd: bool [K], COCO's iscrowd. Crowd regions (RLE over a group of
              objects) are kept, flagged, so a training pipeline can leave
              them out of the targets and ignore their pixels, as Mask R-CNN
              does, and evaluation can match them as COCO's does.

Config "stuff": COCO-Stuff 164k semantic segmentation, 171 classes. The
stuffthingmaps PNGs hold 0-based ids of COCO's 182-id space (value v is
category v + 1; 255 unlabelled). The 171 ids in use (80 things, 91 stuff)
become 0..170 in id order, as mmseg's COCOStuffDataset (164k) has them;
anything else is 255:

  image, file_name, image_id as above
  segmentation_mask: uint8 [H, W, 1]; 0..170, 255 ignore

Splits (both configs): train 118,287 / validation 5,000.
"""
import collections
import dataclasses
import functools
import json

import numpy as np
import tensorflow_datasets as tfds

from segjax import errors
from segjax.data.builders import coco_masks, manual, sources

# (COCO category id, name) of the 80 thing classes.
CATEGORIES = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"),
    (5, "airplane"), (6, "bus"), (7, "train"), (8, "truck"), (9, "boat"),
    (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
    (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"),
    (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"),
    (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"),
    (34, "frisbee"), (35, "skis"), (36, "snowboard"), (37, "sports ball"),
    (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"),
    (44, "bottle"), (46, "wine glass"), (47, "cup"), (48, "fork"),
    (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"),
    (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"),
    (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"),
    (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"),
    (67, "dining table"), (70, "toilet"), (72, "tv"), (73, "laptop"),
    (74, "mouse"), (75, "remote"), (76, "keyboard"), (77, "cell phone"),
    (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"),
    (87, "scissors"), (88, "teddy bear"), (89, "hair drier"),
    (90, "toothbrush"))
CATEGORY_IDS = tuple(i for i, _ in CATEGORIES)
CLASS_NAMES = tuple(name for _, name in CATEGORIES)
# COCO-Stuff's 91 stuff classes, ids 92..182.
STUFF_NAMES = (
    "banner", "blanket", "branch", "bridge", "building-other", "bush",
    "cabinet", "cage", "cardboard", "carpet", "ceiling-other", "ceiling-tile",
    "cloth", "clothes", "clouds", "counter", "cupboard", "curtain",
    "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
    "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog",
    "food-other", "fruit", "furniture-other", "grass", "gravel",
    "ground-other", "hill", "house", "leaves", "light", "mat", "metal",
    "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform",
    "playingfield", "railing", "railroad", "river", "road", "rock", "roof",
    "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow",
    "solid-other", "stairs", "stone", "straw", "structural-other", "table",
    "tent", "textile-other", "towel", "tree", "vegetable", "wall-brick",
    "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other",
    "wood")
STUFF_CLASS_NAMES = CLASS_NAMES + STUFF_NAMES  # 171
# 0-based stuffthingmaps values of the 171 classes, in id order.
STUFF_MAP_IDS = tuple(i - 1 for i in CATEGORY_IDS) + tuple(range(91, 182))
SPLITS = {"train": "train2017", "validation": "val2017"}
SPLIT_SIZES = {"train": 118287, "validation": 5000}
ANNOTATIONS_ARCHIVE = "annotations_trainval2017.zip"
STUFF_ARCHIVE = "stuffthingmaps_trainval2017.zip"

_LABEL_OF_ID = {coco_id: label for label, coco_id in enumerate(CATEGORY_IDS)}
# Values 0..181 outside the 171 (ids COCO never used) and 255 -> ignore.
_STUFF_TABLE = manual.lookup_table(
    [(v, 255) for v in range(182)] + [(255, 255)]
    + [(v, k) for k, v in enumerate(STUFF_MAP_IDS)])

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download from https://cocodataset.org/#download train2017.zip (18 GB),
val2017.zip (1 GB) and {ANNOTATIONS_ARCHIVE} (241 MB), and put them in
<manual_dir>/, as they are or extracted there (<manual_dir>/train2017/,
<manual_dir>/val2017/, <manual_dir>/annotations/instances_train2017.json).
For the "stuff" config also download {STUFF_ARCHIVE} (659 MB) from
http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/{STUFF_ARCHIVE}
into <manual_dir>/, as is or extracted into
<manual_dir>/stuffthingmaps_trainval2017/ (holding train2017/ and val2017/).
""" + manual.MANUAL_DIR_NOTE


@dataclasses.dataclass(eq=False)
class CocoConfig(tfds.core.BuilderConfig):
  """Attributes: stuff: COCO-Stuff semantic maps instead of instances."""
  stuff: bool = False


class CocoInstances(manual.ManualBuilder):
  """COCO 2017 instance masks, or COCO-Stuff 164k semantic maps."""

  name = "coco_instances"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [
      CocoConfig(name="instances", description="COCO 2017 instances: masks, "
                 "boxes, 80 labels, crowd flags."),
      CocoConfig(name="stuff", stuff=True, description="COCO-Stuff 164k: "
                 "171 classes, 255 ignore."),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    image_id = tfds.features.Scalar(dtype=np.int64)
    if self.builder_config.stuff:
      return self.dataset_info_from_configs(
          description=__doc__.split("\n\n")[0],
          features=manual.semantic_features("jpeg", image_id=image_id),
          supervised_keys=("image", "segmentation_mask"),
          homepage="https://github.com/nightrome/cocostuff",
      )
    return self.dataset_info_from_configs(
        description=__doc__.split("\n\n")[0],
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3),
                                         encoding_format="jpeg"),
            "image_id": image_id,
            "file_name": tfds.features.Text(),
            "objects": tfds.features.Sequence({
                "mask": tfds.features.Image(shape=(None, None, 1),
                                            encoding_format="png"),
                "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                "is_crowd": tfds.features.Scalar(dtype=np.bool_),
            }),
        }),
        homepage="https://cocodataset.org/",
    )

  def _split_generators(self, dl_manager):
    manual_dir = self.manual_dir(dl_manager)
    if self.builder_config.stuff:
      maps = sources.locate(
          manual_dir, "the COCO-Stuff label maps (stuffthingmaps_trainval2017)",
          [sources.Candidate("stuffthingmaps_trainval2017"),
           sources.Candidate(STUFF_ARCHIVE)],
          MANUAL_DOWNLOAD_INSTRUCTIONS, required=tuple(SPLITS.values()))
    else:
      annotations = sources.locate(
          manual_dir, "the COCO 2017 annotations",
          [sources.Candidate("annotations"),
           sources.Candidate(ANNOTATIONS_ARCHIVE, inner="annotations")],
          MANUAL_DOWNLOAD_INSTRUCTIONS,
          required=tuple(f"instances_{f}.json" for f in SPLITS.values()))
    generators = {}
    for split, folder in SPLITS.items():
      images = sources.locate(
          manual_dir, f"the COCO {folder} images",
          [sources.Candidate(folder), sources.Candidate(f"{folder}.zip",
                                                        inner=folder)],
          MANUAL_DOWNLOAD_INSTRUCTIONS, required=())
      if self.builder_config.stuff:
        files = images.files("", ".jpg")
        self.check_count(split, len(files), SPLIT_SIZES[split])
        generators[split] = self._examples(
            split, ((f, f) for f in files),
            functools.partial(_stuff_example, images, maps, folder),
            where=images.where())
      else:
        json_path = f"instances_{folder}.json"
        generators[split] = self._examples(
            split, self._instance_records(annotations, json_path, split),
            functools.partial(_instance_example, images),
            where=annotations.where(json_path))
    return generators

  def _instance_records(self, annotations, json_path, split):
    """Yields (file_name, (image record, annotations)) of one split.

    A generator, so that a split's json (448 MB for train) is parsed only
    when tfds writes that split, not both at once.
    """
    records = read_instances_json(annotations, json_path)
    self.check_count(split, len(records), SPLIT_SIZES[split])
    for record in records:
      yield record[0]["file_name"], record


def read_instances_json(source, path) -> list[tuple[dict, list[dict]]]:
  """[(image record, its annotations in file order), ...] of a COCO json."""
  where = source.where(path)
  try:
    data = json.loads(source.read(path))
    annotations = collections.defaultdict(list)
    for ann in data["annotations"]:
      annotations[ann["image_id"]].append(ann)
    return [(image, annotations[image["id"]]) for image in data["images"]]
  except (ValueError, KeyError, TypeError) as e:
    raise errors.DataError(
        f"{where} is not a COCO instances file ({type(e).__name__}: {e}); "
        "expected a JSON object with \"images\" and \"annotations\".\n"
        f"{MANUAL_DOWNLOAD_INSTRUCTIONS}") from e


def _instance_example(images, record) -> dict:
  info, annotations = record
  name = info["file_name"]
  image, (h, w) = manual.rgb_image(manual.read(images, name),
                                   images.where(name))
  if (h, w) != (info["height"], info["width"]):
    raise manual.BadExample(
        f"{images.where(name)} is {h}x{w} (HxW) but its annotations say "
        f"{info['height']}x{info['width']}")
  masks, boxes, labels, crowd = [], [], [], []
  for ann in annotations:
    try:
      label = _LABEL_OF_ID[ann["category_id"]]
      mask = coco_masks.decode(ann["segmentation"], h, w)
      x, y, box_w, box_h = (float(v) for v in ann["bbox"])
    except (ValueError, KeyError, TypeError) as e:
      raise manual.BadExample(
          f"annotation {ann.get('id')} of {name} is unreadable "
          f"({type(e).__name__}: {e})") from e
    masks.append(manual.png_bytes(mask))
    boxes.append((x, y, x + box_w, y + box_h))
    labels.append(label)
    crowd.append(bool(ann.get("iscrowd", 0)))
  return {
      "image": image,
      "image_id": int(info["id"]),
      "file_name": name,
      "objects": {
          "mask": masks,
          "bbox": np.asarray(boxes, np.float32).reshape(-1, 4),
          "label": np.asarray(labels, np.int64),
          "is_crowd": np.asarray(crowd, np.bool_),
      },
  }


def _stuff_example(images, maps, folder, name) -> dict:
  stem = name[:-len(".jpg")]
  if not stem.isdigit():
    raise manual.BadExample(f"{images.where(name)} is not named like a COCO "
                            "image (<12-digit id>.jpg)")
  image, size = manual.rgb_image(manual.read(images, name), images.where(name))
  label = f"{folder}/{stem}.png"
  where = maps.where(label)
  ids = manual.label_map(manual.read(maps, label), where)
  manual.check_size(ids, size, where)
  return {"image": image,
          "segmentation_mask": manual.png_bytes(
              manual.remap(ids, _STUFF_TABLE, where)),
          "image_id": int(stem),
          "file_name": name}
