"""What the builders over manual downloads share.

`ManualBuilder` is their base class: it turns tfds's missing-manual-directory
assertion into a DataError, and it runs each split's examples through
`_examples`, which either stops at the first bad example (a corrupt image, a
missing file, a mask whose size differs from its image, a label id the
dataset does not have), naming the file, or, with `skip_bad_examples=True`,
leaves such examples out and logs how many it left out.

The decoding helpers return what the features store:

  image:             encoded bytes of an RGB image (decoded uint8 [H, W, 3]);
                     an original RGB JPEG/PNG is kept byte for byte, anything
                     else (grey, palette, alpha, CMYK) is converted to RGB and
                     stored as PNG, so nothing is re-compressed lossily
  segmentation_mask: PNG bytes of a uint8 [H, W] label map (decoded as
                     uint8 [H, W, 1]), 255 = ignore
"""
import io
import logging

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from segjax import errors

IGNORE = 255
_LOG = logging.getLogger(__name__)
# How many skipped files a log line names before it only counts.
_NAMED_SKIPS = 10
# What PIL raises for a corrupt, truncated or absurdly large file.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


# The last paragraph of every builder's MANUAL_DOWNLOAD_INSTRUCTIONS.
MANUAL_DIR_NOTE = """\
The manual directory is <data_dir>/downloads/manual/ unless you pass
manual_dir= to segjax.data.builders.load_builder (or a
tfds.download.DownloadConfig(manual_dir=...) to download_and_prepare)."""


class BadExample(errors.DataError):
  """One example's files are missing, unreadable or inconsistent."""


SKIP_HINT = ("Re-extract or re-download the file, or leave such examples out: "
             "train with --config.data.skip_bad_examples=true, or build with "
             "load_builder(name, skip_bad_examples=True).")


class ManualBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A tfds builder that reads files the user downloaded by hand.

  Subclasses set `MANUAL_DOWNLOAD_INSTRUCTIONS` and call `manual_dir` and
  `_examples` from their split generators.

  Args (besides tfds's data_dir, config, version):
    skip_bad_examples: leave out examples whose files are corrupt, missing or
      inconsistent, logging how many, instead of failing on the first one.
  """

  # Nothing is downloaded, so there are no checksums to find (see shapes.py).
  url_infos = None

  def __init__(self, *, skip_bad_examples: bool = False, **kwargs):
    super().__init__(**kwargs)
    self.skip_bad_examples = skip_bad_examples
    # tfds rebuilds pickled builders from this dict.
    self._original_state["skip_bad_examples"] = skip_bad_examples

  def manual_dir(self, dl_manager) -> epath.Path:
    """tfds's manual directory; a DataError if it is missing or empty."""
    try:
      return dl_manager.manual_dir
    except AssertionError as e:
      # tfds's message repeats the instructions; say it once, with the path.
      path = getattr(dl_manager, "_manual_dir", None) or "(not set)"
      raise errors.DataError(
          f"{self.name}: the manual download directory {path} does not exist "
          "or is empty.\n"
          + self.MANUAL_DOWNLOAD_INSTRUCTIONS.replace("<manual_dir>", str(path))
      ) from e

  def _generate_examples(self, *args, **kwargs):
    # tfds requires this method; these builders' split generators return
    # `_examples(...)` generators instead, so it is never called.
    raise NotImplementedError(f"{type(self).__name__} yields examples from its "
                              "split generators (ManualBuilder._examples)")

  def check_count(self, split: str, found: int, expected: int | None):
    """Logs a warning when a split does not have its official size, which
    usually means a partial download or extraction."""
    if expected is not None and found != expected:
      _LOG.warning("%s %s: found %d examples, the official split has %d; is "
                   "the download complete?", self.name, split, found, expected)

  def _examples(self, split: str, items, make_example, where: str = ""):
    """Yields (key, make_example(item)) for (key, item) in `items`.

    A `BadExample` stops the build, unless `skip_bad_examples`, in which
    case the example is dropped and counted; the count is logged at the end
    of the split. A split left without examples is a DataError (tfds cannot
    write an empty split).

    Args:
      where: where the split's files were looked for, for the message.
    """
    skipped, kept = [], 0
    for key, item in items:
      try:
        example = make_example(item)
      except BadExample as e:
        if not self.skip_bad_examples:
          raise BadExample(f"{self.name} {split}: {e}\n{SKIP_HINT}") from e
        skipped.append(str(e).splitlines()[0])
        continue
      kept += 1
      yield key, example
    if skipped:
      named = "\n  ".join(skipped[:_NAMED_SKIPS])
      more = len(skipped) - _NAMED_SKIPS
      _LOG.warning("%s %s: skipped %d bad example(s):\n  %s%s", self.name,
                   split, len(skipped), named,
                   f"\n  ... and {more} more" if more > 0 else "")
    if not kept:
      found = (f"all {len(skipped)} examples are bad (see the log)"
               if skipped else f"no examples found{' in ' + where if where else ''}")
      raise errors.DataError(
          f"{self.name} {split}: {found}. Check that the download is "
          f"complete and extracted as described:\n"
          f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")


def semantic_features(image_format: str,
                      **extra) -> tfds.features.FeaturesDict:
  """The features of a semantic segmentation dataset (as segjax_shapes').

  Args:
    image_format: "jpeg" or "png", the format most images come in.
    **extra: more features, e.g. image_id=tfds.features.Scalar(np.int64).
  """
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3),
                                   encoding_format=image_format),
      "segmentation_mask": tfds.features.Image(shape=(None, None, 1),
                                               encoding_format="png"),
      "file_name": tfds.features.Text(),
      **extra,
  })


def read(source, path: str) -> bytes:
  """A file an example needs; a BadExample naming it if it is missing."""
  try:
    return source.read(path)
  except FileNotFoundError as e:
    raise BadExample(f"missing file {source.where(path)}") from e


def rgb_image(data: bytes, where: str) -> tuple[bytes, tuple[int, int]]:
  """Checks an image file and returns (encoded RGB bytes, (H, W)).

  The whole image is decoded, so a truncated or corrupt file is caught here
  rather than while training.
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      if image.format in ("JPEG", "PNG") and image.mode == "RGB":
        return data, (image.height, image.width)
      rgb = image.convert("RGB")
  except _DECODE_ERRORS as e:
    raise BadExample(f"cannot decode image {where}: {e}") from e
  return png_bytes(np.asarray(rgb)), (rgb.height, rgb.width)


def label_map(data: bytes, where: str) -> np.ndarray:
  """uint8 [H, W] label ids of a label PNG.

  A palette ("P") PNG gives its palette indices, not its colours: VOC's
  masks store the class id as the index and only draw it in VOC colours.
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      if image.mode not in ("P", "L"):
        raise BadExample(
            f"label image {where} has mode {image.mode!r}; expected a "
            "single-channel (L) or palette (P) PNG of class ids")
      return np.array(image, dtype=np.uint8)
  except _DECODE_ERRORS as e:
    raise BadExample(f"cannot decode label image {where}: {e}") from e


def check_size(label: np.ndarray, image_hw: tuple[int, int], where: str):
  if tuple(label.shape[:2]) != tuple(image_hw):
    raise BadExample(
        f"label {where} is {label.shape[0]}x{label.shape[1]} (HxW) but its "
        f"image is {image_hw[0]}x{image_hw[1]}")


def remap(ids: np.ndarray, table: np.ndarray, where: str) -> np.ndarray:
  """uint8 [H, W] = table[ids]; ids the table marks -1 are a BadExample.

  Args:
    ids: int [H, W] raw label ids of the dataset.
    table: int [N] from raw id to training id (255 = ignore), -1 for ids the
      dataset does not have.
  """
  ids = np.asarray(ids)
  unknown = (ids < 0) | (ids >= len(table))
  if not unknown.any():
    mapped = table[ids]
    unknown = mapped < 0
  if unknown.any():
    bad = np.unique(ids[unknown])[:10].tolist()
    raise BadExample(f"label {where} has ids {bad}, which this dataset "
                     "does not define")
  return mapped.astype(np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
  """PNG of a uint8 [H, W] (grey) or [H, W, 3] (RGB) array."""
  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(
      buffer, format="PNG")
  return buffer.getvalue()


def lookup_table(pairs, size: int = 256, default: int = -1) -> np.ndarray:
  """int16 [size] mapping raw id -> training id from (raw, train) pairs."""
  table = np.full(size, default, np.int16)
  for raw, train in pairs:
    table[raw] = train
  return table
