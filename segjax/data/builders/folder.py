"""`folder:<path>`: a segmentation dataset from a folder of image files.

For one's own data, without writing a builder. The layout (mmsegmentation's
custom-dataset layout)::

  <path>/images/<split>/<name>.{jpg,jpeg,png,bmp}   any size, RGB/gray/RGBA
  <path>/labels/<split>/<name>.png                  class indices, same size;
                                                    255 = ignore

Splits are the sub-folders of `images/` ("val" is read as "validation").
Set `config.dataset = "folder:/data/my_set"` and `config.num_classes`.

The folder is prepared into the tfds data_dir once, like any tfds dataset,
under a config named after a hash of the folder's path and of its files'
names, sizes and modification times: adding or changing a file prepares it
afresh. Features are those of the semantic builders: image uint8 [H, W, 3],
segmentation_mask uint8 [H, W, 1], file_name.
"""
import dataclasses
import hashlib
import os

import tensorflow_datasets as tfds

from segjax import errors
from segjax.data.builders import manual, sources

PREFIX = "folder:"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
_SPLIT_NAMES = {"val": "validation"}


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
  root: str = ""


class SegmentationFolder(manual.ManualBuilder):
  """Images and index-PNG labels from <root>/{images,labels}/<split>/."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put images in <root>/images/<split>/ and same-named single-channel PNG "
      "labels in <root>/labels/<split>/.")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"Segmentation images and labels from {self.builder_config.root}",
        features=manual.semantic_features("png"))

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    root = self.builder_config.root
    return {_SPLIT_NAMES.get(split, split):
            self._examples(split, _pairs(root, split), _example,
                           where=os.path.join(root, "images", split))
            for split in _splits(root)}


def _example(paths):
  source, image_path, label_path = paths
  image, image_hw = manual.rgb_image(manual.read(source, image_path),
                                     source.where(image_path))
  label = manual.label_map(manual.read(source, label_path), source.where(label_path))
  manual.check_size(label, image_hw, source.where(label_path))
  return {"image": image, "segmentation_mask": label[..., None],
          "file_name": os.path.basename(image_path)}


def _splits(root):
  images = os.path.join(root, "images")
  if not os.path.isdir(images):
    raise errors.DataError(
        f"dataset folder {root!r} has no images/ sub-folder; expected "
        "<root>/images/<split>/*.jpg and <root>/labels/<split>/*.png")
  splits = sorted(d for d in os.listdir(images)
                  if os.path.isdir(os.path.join(images, d)))
  if not splits:
    raise errors.DataError(f"{images!r} has no split folders (e.g. train/, val/)")
  return splits


def _pairs(root, split):
  """(name, (source, image path, label path)) of every image of a split, by
  name; paths relative to the folder."""
  source = sources.FolderSource(root)
  pairs = []
  for name in sorted(os.listdir(os.path.join(root, "images", split))):
    stem, ext = os.path.splitext(name)
    if ext.lower() not in IMAGE_EXTENSIONS:
      continue
    pairs.append((name, (source, f"images/{split}/{name}",
                         f"labels/{split}/{stem}.png")))
  return pairs


def fingerprint(root):
  """A short hash of the folder's path and its files' names, sizes, times."""
  digest = hashlib.sha1(os.path.abspath(root).encode())
  for sub in ("images", "labels"):
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, sub)):
      dirnames.sort()
      for name in sorted(filenames):
        stat = os.stat(os.path.join(dirpath, name))
        digest.update(f"{dirpath}/{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
  return digest.hexdigest()[:16]


def make_builder(name, data_dir, **kwargs):
  """The prepared builder of dataset name "folder:<path>"."""
  root = os.path.expanduser(name[len(PREFIX):])
  if not os.path.isdir(root):
    raise errors.DataError(
        f"dataset folder {root!r} does not exist; set config.dataset to "
        "'folder:<path>' of a folder with images/<split>/ and labels/<split>/")
  config = FolderConfig(name="f" + fingerprint(root), root=os.path.abspath(root))
  builder = SegmentationFolder(config=config, data_dir=data_dir, **kwargs)
  builder.download_and_prepare()
  return builder
