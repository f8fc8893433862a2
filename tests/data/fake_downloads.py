"""Helpers for the builder tests: tiny files in the real datasets' formats,
and building a tfds dataset from a fake manual directory."""
import io
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from segjax import viz


def solid(h, w, colour) -> np.ndarray:
  """uint8 [h, w, 3] of one colour (survives JPEG almost exactly)."""
  return np.broadcast_to(np.asarray(colour, np.uint8), (h, w, 3)).copy()


def _save(image: Image.Image, path, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path, **kwargs)


def write_image(path, array) -> None:
  """uint8 [H, W, 3] (RGB) or [H, W] (grey) as JPEG or PNG, by suffix."""
  _save(Image.fromarray(np.asarray(array, np.uint8)), path,
        **({"quality": 95} if str(path).endswith(".jpg") else {}))


def image_bytes(array, fmt="PNG") -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(array, np.uint8)).save(buffer, format=fmt)
  return buffer.getvalue()


def write_palette_png(path, ids) -> None:
  """uint8 [H, W] ids as a palette ("P") PNG in VOC colours, as VOC's
  SegmentationClass files are stored."""
  ids = np.ascontiguousarray(ids, np.uint8)
  image = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.tobytes())
  image.putpalette(viz.palette(256).ravel().tolist())
  _save(image, path)


def write_grey_png(path, ids) -> None:
  """uint8 [H, W] ids as a single-channel ("L") PNG."""
  _save(Image.fromarray(np.ascontiguousarray(ids, np.uint8)), path)


def write_text(path, lines) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("".join(f"{line}\n" for line in lines))


def build(builder_cls, data_dir, manual_dir, config=None, **kwargs):
  """Prepares `builder_cls` from `manual_dir` into `data_dir`."""
  if config is not None:
    kwargs["config"] = config
  builder = builder_cls(data_dir=str(data_dir), **kwargs)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual_dir)))
  return builder


def examples(builder, split) -> dict:
  """{file_name: example as numpy} of a prepared split."""
  ds = builder.as_dataset(split=split, shuffle_files=False)
  return {ex["file_name"].decode(): ex for ex in tfds.as_numpy(ds)}


def split_sizes(builder) -> dict:
  return {name: info.num_examples for name, info in builder.info.splits.items()}
