"""What an instance evaluation compares against: each image of a split at
its stored size with every instance (crowd regions included), and the
dataset's class names.
"""
from typing import Dict, Iterator, List

import tensorflow as tf

from segjax.data import instances, streams
from segjax.errors import DataError

# Ground truth rows read per image: all of them (COCO has at most a few
# hundred, crowds included).
_ALL_INSTANCES = 100_000


def instance_ground_truth(config, split: str) -> Iterator[Dict]:
  """Yields each image of the split at its stored size, crowds included.

  Yields:
    dict: "image_id" int, "height", "width", "boxes" [G,4] float32,
    "classes" [G] int32 (label + 1), "masks" [G,H,W] uint8, "crowd" [G] bool.
  """
  builder = streams.builder(config)
  ds = builder.as_dataset(split=split, shuffle_files=False)
  if "image_id" not in ds.element_spec:
    raise DataError(f"dataset {config.dataset} has no image_id feature; COCO "
                    "evaluation matches detections to ground truth by it")
  ds = ds.map(lambda ex: instances.select_instances(ex, _ALL_INSTANCES, drop_crowd=False,
                                                    mask_size=None),
              num_parallel_calls=tf.data.AUTOTUNE)
  for ex in streams.checked(ds.prefetch(2), config, lambda *_: None):
    height, width = ex["image"].shape[:2]
    yield {"image_id": int(ex["image_id"]), "height": height, "width": width,
           "boxes": ex["boxes"], "classes": ex["classes"], "masks": ex["masks"],
           "crowd": ex["crowd"]}


def class_names(config) -> List[str]:
  """The dataset's object class names, index 0 "background"; "class k" for
  each of the num_classes - 1 classes when the dataset names none."""
  try:
    return ["background", *streams.builder(config).info.features["objects"]["label"].names]
  except (KeyError, AttributeError, TypeError):
    return ["background"] + [f"class {k}" for k in range(1, config.num_classes)]
