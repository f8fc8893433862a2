"""segjax's own tfds builders and `load_builder`, which prepares them.

`BUILDERS` maps a dataset name to its builder class; importing this package
registers them with tfds, so `tfds.builder("voc2012_segmentation")` works
too (Cityscapes is registered as "segjax_cityscapes", clear of tfds's own).
`DATASET_INFO` holds what the rest of segjax needs to know about each
dataset's classes (names, count, colours, ignore id) without opening it:
one entry per builder for its default config, plus "<builder>/<config>"
entries for configs whose classes differ; `dataset_info` picks the right
one for a config.dataset string.

segjax_shapes is generated; the others read a manual download (see each
module's MANUAL_DOWNLOAD_INSTRUCTIONS), prepared once with e.g.
`load_builder("ade20k", data_dir, manual_dir="~/downloads")`.
"""
import os

import tensorflow_datasets as tfds

from segjax import errors
from segjax import viz
from segjax.data.builders import folder, manual
from segjax.data.builders import (ade20k, cityscapes, coco, pascal_context,
                                  shapes, voc)

BUILDERS = {
    "segjax_shapes": shapes.SegjaxShapes,
    "voc2012_segmentation": voc.Voc2012Segmentation,
    "pascal_context": pascal_context.PascalContext,
    "cityscapes": cityscapes.Cityscapes,
    "ade20k": ade20k.Ade20k,
    "coco_instances": coco.CocoInstances,
}


def _semantic(class_names, palette=None, label_key="segmentation_mask"):
  return dict(
      num_classes=len(class_names),
      class_names=tuple(class_names),
      palette=viz.palette(len(class_names)) if palette is None else palette,
      ignore_index=255,
      image_key="image",
      label_key=label_key,
  )


DATASET_INFO = {
    "segjax_shapes": _semantic(shapes.CLASS_NAMES),
    # The VOC colour map, as VOC's own label PNGs draw the classes.
    "voc2012_segmentation": _semantic(voc.CLASS_NAMES),
    "pascal_context": _semantic(pascal_context.CLASS_NAMES_59),
    "pascal_context/60": _semantic(pascal_context.CLASS_NAMES_60),
    "pascal_context/full": _semantic(pascal_context.FULL_NAMES),
    "cityscapes": _semantic(cityscapes.CLASS_NAMES, cityscapes.PALETTE),
    "ade20k": _semantic(ade20k.CLASS_NAMES, ade20k.PALETTE),
    # Instances: labels are `objects/label` (0..79), not a label map.
    "coco_instances": _semantic(coco.CLASS_NAMES, label_key="objects"),
    "coco_instances/stuff": _semantic(coco.STUFF_CLASS_NAMES),
}


def dataset_info(name: str) -> dict:
  """The DATASET_INFO entry of "builder" or "builder/config".

  A config without an entry of its own shares its builder's classes, e.g.
  "voc2012_segmentation/aug" -> DATASET_INFO["voc2012_segmentation"].

  Raises:
    DataError: if the builder is unknown.
  """
  if name in DATASET_INFO:
    return DATASET_INFO[name]
  base = name.partition("/")[0]
  if base not in DATASET_INFO:
    raise errors.DataError(
        f"Unknown dataset {name!r}. Known builders: "
        f"{', '.join(sorted(BUILDERS))}. Set config.dataset to one of them.")
  return DATASET_INFO[base]


def default_data_dir() -> str:
  """`$TFDS_DATA_DIR` if set, else `~/tensorflow_datasets`."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
      os.path.join("~", "tensorflow_datasets"))


def load_builder(name: str, data_dir: str | None = None,
                 manual_dir: str | None = None,
                 **builder_kwargs) -> tfds.core.DatasetBuilder:
  """Returns the builder of dataset `name`, generated into `data_dir` if new.

  Generated datasets (segjax_shapes) need no download: the first call writes
  them (tfrecord files) and later calls only read the prepared folder. The
  others are prepared, on the first call, from the files the user downloaded
  into `manual_dir` (see the builder's MANUAL_DOWNLOAD_INSTRUCTIONS).

  Args:
    name: a key of `BUILDERS`, optionally with a config, e.g.
      "segjax_shapes" or "segjax_shapes/default".
    data_dir: root of prepared datasets; default `default_data_dir()`.
    manual_dir: folder holding the manual download; default tfds's
      `<data_dir>/downloads/manual/`. Only read when the dataset is new.
    **builder_kwargs: passed to the builder, e.g.
      `config=shapes.ShapesConfig(name="tiny", split_sizes=(8, 2, 2))`, or
      `skip_bad_examples=True` for the manual-download builders.

  Returns:
    A prepared `tfds.core.DatasetBuilder`: call `.as_dataset(split=...)`.

  Raises:
    DataError: if `name` is not a known builder, or its manual download is
      missing or broken (the message says which file and how to fix it).
  """
  if name.startswith(folder.PREFIX):  # "folder:<path>": one's own files
    return folder.make_builder(name, os.path.expanduser(data_dir or default_data_dir()),
                               **builder_kwargs)
  base, _, config = name.partition("/")
  if base not in BUILDERS:
    raise errors.DataError(
        f"Unknown dataset builder {name!r}. Known builders: "
        f"{', '.join(sorted(BUILDERS))}. Set config.dataset to one of them.")
  if config:
    if "config" in builder_kwargs:
      raise errors.ConfigError(
          f"load_builder({name!r}) names a config and also got config=; "
          "give only one.")
    builder_kwargs["config"] = config
  data_dir = os.path.expanduser(data_dir or default_data_dir())
  if not issubclass(BUILDERS[base], manual.ManualBuilder):
    builder_kwargs.pop("skip_bad_examples", None)  # Generated data has none.
  try:
    builder = BUILDERS[base](data_dir=data_dir, **builder_kwargs)
  except ValueError as e:  # tfds reports an unknown config as ValueError.
    raise errors.DataError(f"Cannot build {name!r}: {e}") from e
  download_config = None
  if manual_dir:
    download_config = tfds.download.DownloadConfig(
        manual_dir=os.path.expanduser(manual_dir))
  builder.download_and_prepare(download_config=download_config)
  return builder
