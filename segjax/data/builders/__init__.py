"""segjax's own tfds builders and `load_builder`, which prepares them.

`BUILDERS` maps a dataset name to its builder class; importing this package
registers them with tfds, so `tfds.builder("segjax_shapes")` works too.
`DATASET_INFO` holds what the rest of segjax needs to know about each
dataset's classes (names, count, colours, ignore id) without opening it.
"""
import os

import tensorflow_datasets as tfds

from segjax import errors
from segjax import viz
from segjax.data.builders import shapes

BUILDERS = {
    "segjax_shapes": shapes.SegjaxShapes,
}

DATASET_INFO = {
    "segjax_shapes": dict(
        num_classes=len(shapes.CLASS_NAMES),
        class_names=shapes.CLASS_NAMES,
        palette=viz.palette(len(shapes.CLASS_NAMES)),
        ignore_index=255,
        image_key="image",
        label_key="segmentation_mask",
    ),
}


def default_data_dir() -> str:
  """`$TFDS_DATA_DIR` if set, else `~/tensorflow_datasets`."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
      os.path.join("~", "tensorflow_datasets"))


def load_builder(name: str, data_dir: str | None = None,
                 **builder_kwargs) -> tfds.core.DatasetBuilder:
  """Returns the builder of dataset `name`, generated into `data_dir` if new.

  Generated datasets (segjax_shapes) need no download: the first call writes
  them (tfrecord files) and later calls only read the prepared folder.

  Args:
    name: a key of `BUILDERS`, optionally with a config, e.g.
      "segjax_shapes" or "segjax_shapes/default".
    data_dir: root of prepared datasets; default `default_data_dir()`.
    **builder_kwargs: passed to the builder, e.g.
      `config=shapes.ShapesConfig(name="tiny", split_sizes=(8, 2, 2))`.

  Returns:
    A prepared `tfds.core.DatasetBuilder`: call `.as_dataset(split=...)`.

  Raises:
    DataError: if `name` is not a known builder.
  """
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
  try:
    builder = BUILDERS[base](data_dir=data_dir, **builder_kwargs)
  except ValueError as e:  # tfds reports an unknown config as ValueError.
    raise errors.DataError(f"Cannot build {name!r}: {e}") from e
  builder.download_and_prepare()
  return builder
