"""`pascal_context`: PASCAL-Context (whole-scene labels on VOC 2010 images).

Reads the manual download (nothing is fetched at build time):

  <manual_dir>/VOCtrainval_03-May-2010.tar   as downloaded, or extracted:
  <manual_dir>/VOCdevkit/VOC2010/JPEGImages/*.jpg
  <manual_dir>/trainval_merged.json          (or VOCdevkit/VOC2010/trainval_merged.json)

`trainval_merged.json` is the PASCAL in Detail annotation file (the format
of its detail-api, a fork of COCO's API). What this builder reads of it:

  images:             [{"image_id", "file_name", "height", "width",
                        "phase": "train" | "val"}, ...]
  annos_segmentation: [{"image_id", "category_id" (1..459),
                        "segmentation": COCO RLE or polygons}, ...]

An image's label map is 0 (unlabelled) painted over, in file order, with
each of its annotations' category id, as detail-api's `getMask` does. The
ids are those of PASCAL-Context's 459 labels (`FULL_NAMES[id - 1]`).

Configs (the label mapping; images and splits are the same):
  "59":   the 59 classes of the standard benchmark -> 0..58 (in id order,
          as mmseg's PascalContextDataset59); every other pixel
          (unlabelled or one of the other 400 labels) -> 255, ignored.
          This equals mmseg's conversion followed by its reduce_zero_label.
  "60":   the same 59 classes as 1..59 plus 0 = background for every other
          pixel (mmseg's PascalContextDataset, 60 classes, nothing ignored).
  "full": label k -> k - 1 (0..458), unlabelled -> 255. The released
          trainval_merged.json annotates, as far as its converters (mmseg,
          PyTorch-Encoding) show, only the 59 benchmark classes, so "full"
          holds no more classes than "59" unless the json does.

Splits: train 4,998 / validation 5,105 (the json's "phase").

Features:
  image:             uint8 [H, W, 3], variable size (about 500x375)
  segmentation_mask: uint8 [H, W, 1] (ids per config, 255 ignore)
  file_name:         e.g. "2008_000002.jpg"
"""
import collections
import dataclasses
import functools
import json

import numpy as np
import tensorflow_datasets as tfds

from segjax import errors
from segjax.data.builders import coco_masks, manual, sources

# PASCAL-Context's 459 labels (labels.txt); label k is FULL_NAMES[k - 1].
FULL_NAMES = (
    "accordion", "aeroplane", "air conditioner", "antenna", "artillery",
    "ashtray", "atrium", "baby carriage", "bag", "ball", "balloon",
    "bamboo weaving", "barrel", "baseball bat", "basket",
    "basketball backboard", "bathtub", "bed", "bedclothes", "beer", "bell",
    "bench", "bicycle", "binoculars", "bird", "bird cage", "bird feeder",
    "bird nest", "blackboard", "board", "boat", "bone", "book", "bottle",
    "bottle opener", "bowl", "box", "bracelet", "brick", "bridge", "broom",
    "brush", "bucket", "building", "bus", "cabinet", "cabinet door", "cage",
    "cake", "calculator", "calendar", "camel", "camera", "camera lens", "can",
    "candle", "candle holder", "cap", "car", "card", "cart", "case",
    "casette recorder", "cash register", "cat", "cd", "cd player", "ceiling",
    "cell phone", "cello", "chain", "chair", "chessboard", "chicken",
    "chopstick", "clip", "clippers", "clock", "closet", "cloth",
    "clothes tree", "coffee", "coffee machine", "comb", "computer", "concrete",
    "cone", "container", "control booth", "controller", "cooker",
    "copying machine", "coral", "cork", "corkscrew", "counter", "court", "cow",
    "crabstick", "crane", "crate", "cross", "crutch", "cup", "curtain",
    "cushion", "cutting board", "dais", "disc", "disc case", "dishwasher",
    "dock", "dog", "dolphin", "door", "drainer", "dray", "drink dispenser",
    "drinking machine", "drop", "drug", "drum", "drum kit", "duck", "dumbbell",
    "earphone", "earrings", "egg", "electric fan", "electric iron",
    "electric pot", "electric saw", "electronic keyboard", "engine",
    "envelope", "equipment", "escalator", "exhibition booth", "extinguisher",
    "eyeglass", "fan", "faucet", "fax machine", "fence", "ferris wheel",
    "fire extinguisher", "fire hydrant", "fire place", "fish", "fish tank",
    "fishbowl", "fishing net", "fishing pole", "flag", "flagstaff", "flame",
    "flashlight", "floor", "flower", "fly", "foam", "food", "footbridge",
    "forceps", "fork", "forklift", "fountain", "fox", "frame", "fridge", "frog",
    "fruit", "funnel", "furnace", "game controller", "game machine",
    "gas cylinder", "gas hood", "gas stove", "gift box", "glass",
    "glass marble", "globe", "glove", "goal", "grandstand", "grass",
    "gravestone", "ground", "guardrail", "guitar", "gun", "hammer",
    "hand cart", "handle", "handrail", "hanger", "hard disk drive", "hat",
    "hay", "headphone", "heater", "helicopter", "helmet", "holder", "hook",
    "horse", "horse-drawn carriage", "hot-air balloon", "hydrovalve", "ice",
    "inflator pump", "ipod", "iron", "ironing board", "jar", "kart", "kettle",
    "key", "keyboard", "kitchen range", "kite", "knife", "knife block",
    "ladder", "ladder truck", "ladle", "laptop", "leaves", "lid", "life buoy",
    "light", "light bulb", "lighter", "line", "lion", "lobster", "lock",
    "machine", "mailbox", "mannequin", "map", "mask", "mat", "match book",
    "mattress", "menu", "metal", "meter box", "microphone", "microwave",
    "mirror", "missile", "model", "money", "monkey", "mop", "motorbike",
    "mountain", "mouse", "mouse pad", "musical instrument", "napkin", "net",
    "newspaper", "oar", "ornament", "outlet", "oven", "oxygen bottle", "pack",
    "pan", "paper", "paper box", "paper cutter", "parachute", "parasol",
    "parterre", "patio", "pelage", "pen", "pen container", "pencil", "person",
    "photo", "piano", "picture", "pig", "pillar", "pillow", "pipe", "pitcher",
    "plant", "plastic", "plate", "platform", "player", "playground", "pliers",
    "plume", "poker", "poker chip", "pole", "pool table", "postcard", "poster",
    "pot", "pottedplant", "printer", "projector", "pumpkin", "rabbit",
    "racket", "radiator", "radio", "rail", "rake", "ramp", "range hood",
    "receiver", "recorder", "recreational machines", "remote control", "road",
    "robot", "rock", "rocket", "rocking horse", "rope", "rug", "ruler",
    "runway", "saddle", "sand", "saw", "scale", "scanner", "scissors", "scoop",
    "screen", "screwdriver", "sculpture", "scythe", "sewer", "sewing machine",
    "shed", "sheep", "shell", "shelves", "shoe", "shopping cart", "shovel",
    "sidecar", "sidewalk", "sign", "signal light", "sink", "skateboard", "ski",
    "sky", "sled", "slippers", "smoke", "snail", "snake", "snow",
    "snowmobiles", "sofa", "spanner", "spatula", "speaker", "speed bump",
    "spice container", "spoon", "sprayer", "squirrel", "stage", "stair",
    "stapler", "stick", "sticky note", "stone", "stool", "stove", "straw",
    "stretcher", "sun", "sunglass", "sunshade", "surveillance camera", "swan",
    "sweeper", "swim ring", "swimming pool", "swing", "switch", "table",
    "tableware", "tank", "tap", "tape", "tarp", "telephone",
    "telephone booth", "tent", "tire", "toaster", "toilet", "tong", "tool",
    "toothbrush", "towel", "toy", "toy car", "track", "train", "trampoline",
    "trash bin", "tray", "tree", "tricycle", "tripod", "trophy", "truck",
    "tube", "turtle", "tvmonitor", "tweezers", "typewriter", "umbrella",
    "unknown", "vacuum cleaner", "vending machine", "video camera",
    "video game console", "video player", "video tape", "violin", "wakeboard",
    "wall", "wallet", "wardrobe", "washing machine", "watch", "water",
    "water dispenser", "water pipe", "water skate board", "watermelon",
    "whale", "wharf", "wheel", "wheelchair", "window", "window blinds",
    "wineglass", "wire", "wood", "wool")
# The 459-label ids of the 59 benchmark classes, in id order.
CONTEXT59_IDS = (
    2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85,
    98, 104, 105, 113, 115, 144, 158, 159, 162, 187, 189, 207, 220, 232, 258,
    259, 260, 284, 295, 296, 308, 324, 326, 347, 349, 354, 355, 360, 366, 368,
    397, 415, 416, 420, 424, 427, 440, 445, 454, 458)
CLASS_NAMES_59 = tuple(FULL_NAMES[i - 1] for i in CONTEXT59_IDS)
CLASS_NAMES_60 = ("background",) + CLASS_NAMES_59
SPLITS = {"train": "train", "validation": "val"}
SPLIT_SIZES = {"train": 4998, "validation": 5105}
VOC_ARCHIVE = "VOCtrainval_03-May-2010.tar"
JSON_NAME = "trainval_merged.json"

_VOC_PLACES = [
    sources.Candidate("VOCdevkit/VOC2010"),
    sources.Candidate("VOCtrainval_03-May-2010/VOCdevkit/VOC2010"),
    sources.Candidate(VOC_ARCHIVE, inner="VOCdevkit/VOC2010"),
]
_JSON_PLACES = [JSON_NAME, f"VOCdevkit/VOC2010/{JSON_NAME}"]
_NUM_LABELS = len(FULL_NAMES)  # 459

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download {VOC_ARCHIVE} (1.3 GB) from
http://host.robots.ox.ac.uk/pascal/VOC/voc2010/ and put it in <manual_dir>/,
as is or extracted (<manual_dir>/VOCdevkit/VOC2010/). Download the PASCAL in
Detail annotations {JSON_NAME} (the file mmsegmentation's PASCAL-Context
instructions use: https://codalabuser.blob.core.windows.net/public/{JSON_NAME})
into <manual_dir>/ (or <manual_dir>/VOCdevkit/VOC2010/).
""" + manual.MANUAL_DIR_NOTE


def _table(config_name: str) -> np.ndarray:
  """int16 [460]: 459-label id (0 = unlabelled) -> training id."""
  if config_name == "full":
    return manual.lookup_table(
        [(0, 255)] + [(k, k - 1) for k in range(1, _NUM_LABELS + 1)],
        size=_NUM_LABELS + 1)
  if config_name == "60":
    pairs = [(k, i + 1) for i, k in enumerate(CONTEXT59_IDS)]
    return manual.lookup_table(pairs, _NUM_LABELS + 1, default=0)
  pairs = [(k, i) for i, k in enumerate(CONTEXT59_IDS)]
  return manual.lookup_table(pairs, _NUM_LABELS + 1, default=255)


@dataclasses.dataclass(eq=False)
class ContextConfig(tfds.core.BuilderConfig):
  """A label mapping; see the module docstring."""


class PascalContext(manual.ManualBuilder):
  """PASCAL-Context from PASCAL in Detail's trainval_merged.json."""

  name = "pascal_context"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [
      ContextConfig(name="59", description="59 classes (0..58), everything "
                    "else ignored (255)."),
      ContextConfig(name="60", description="background (0) + 59 classes "
                    "(1..59)."),
      ContextConfig(name="full", description="459 labels (0..458), "
                    "unlabelled ignored (255)."),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__.split("\n\n")[0],
        features=manual.semantic_features("jpeg"),
        supervised_keys=("image", "segmentation_mask"),
        homepage="https://cs.stanford.edu/~roozbeh/pascal-context/",
    )

  def _split_generators(self, dl_manager):
    manual_dir = self.manual_dir(dl_manager)
    voc = sources.locate(manual_dir, "PASCAL VOC 2010 (trainval)", _VOC_PLACES,
                         MANUAL_DOWNLOAD_INSTRUCTIONS, required=("JPEGImages",))
    json_path = sources.locate_file(
        manual_dir, f"the PASCAL in Detail annotations ({JSON_NAME})",
        _JSON_PLACES, MANUAL_DOWNLOAD_INSTRUCTIONS)
    images = read_detail_json(json_path)
    make = functools.partial(_example, voc, _table(self.builder_config.name),
                             str(json_path))
    generators = {}
    for split, phase in SPLITS.items():
      records = [r for r in images if r[0]["phase"] == phase]
      self.check_count(split, len(records), SPLIT_SIZES[split])
      generators[split] = self._examples(
          split, ((r[0]["file_name"], r) for r in records), make,
          where=f"{json_path} (phase {phase!r})")
    return generators


def read_detail_json(path) -> list[tuple[dict, list[dict]]]:
  """[(image record, its segmentation annotations in file order), ...]."""
  try:
    data = json.loads(path.read_bytes())
    annotations = collections.defaultdict(list)
    for ann in data["annos_segmentation"]:
      annotations[ann["image_id"]].append(ann)
    images = [(image, annotations[image["image_id"]])
              for image in data["images"]]
    for image, _ in images:
      for key in ("file_name", "phase", "height", "width"):
        if key not in image:
          raise KeyError(f"image {image.get('image_id')} has no {key!r}")
  except (ValueError, KeyError, TypeError) as e:
    raise errors.DataError(
        f"{path} is not a PASCAL in Detail annotation file ({type(e).__name__}"
        f": {e}); expected a JSON object with \"images\" and "
        f"\"annos_segmentation\".\n{MANUAL_DOWNLOAD_INSTRUCTIONS}") from e
  return images


def _example(voc, table, json_where, record) -> dict:
  image_record, annotations = record
  name = image_record["file_name"]
  path = f"JPEGImages/{name}"
  image, size = manual.rgb_image(manual.read(voc, path), voc.where(path))
  where = f"{json_where} (image {name})"
  h, w = int(image_record["height"]), int(image_record["width"])
  if (h, w) != size:
    raise manual.BadExample(
        f"{where} says {h}x{w} (HxW) but {voc.where(path)} is "
        f"{size[0]}x{size[1]}")
  ids = np.zeros((h, w), np.int32)
  for ann in annotations:  # Later annotations paint over earlier ones.
    try:
      inside = coco_masks.decode(ann["segmentation"], h, w)
      ids[inside > 0] = int(ann["category_id"])
    except (ValueError, KeyError, TypeError) as e:
      raise manual.BadExample(
          f"{where}: annotation {ann.get('id')} is unreadable: {e}") from e
  return {"image": image,
          "segmentation_mask": manual.png_bytes(manual.remap(ids, table, where)),
          "file_name": name}
