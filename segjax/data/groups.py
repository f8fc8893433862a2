"""Groups of examples batched apart: which group each example is in, and
which group each training step draws from.

A jit-compiled step wants one input shape, and a canvas that fits every
image wastes pixels on most of them (a square canvas holds a landscape
800 x 1333 image with 1.7x its pixels). So, as torchvision's
GroupedBatchSampler and detectron2's AspectRatioGroupedDataset do, examples
are split into groups (for Mask R-CNN: by orientation) and every batch holds
one group only, on that group's canvas.

Membership comes from the image sizes as stored, read once per split
(`image_sizes`; no decoding for JPEG files, none at all for datasets whose
images have one static size), so a group's stream (`members_only`) reads
the split with its images left encoded and decodes only the group's.

The group of training step t is dealt from a deck of N cards (N = the
split's size), n_g of them marked with group g (n_g = the split's examples in
g): steps kN ... kN+N-1 take the cards in an order shuffled by (seed, k)
(`tf.random.experimental.index_shuffle`). Hence:
  * the groups keep the dataset's proportions exactly over every N steps
    (and so every image is drawn about as often as in an ungrouped stream);
  * the group of a step is a pure function of (seed, t), and the number of
    steps of each group before step t takes O(N) arithmetic, not O(t) and no
    data: a resumed stream starts each group's stream where it stood.
torchvision's sampler instead buffers examples per group and yields a
batch when a buffer fills, so which group comes next depends on the buffers,
i.e. on every example read since the start: exact resumption would replay
the epoch. The deck decides the group first and then takes the next b
examples of that group's own shuffled stream; the price is a pass over the
split's records (every shard's, on every host: the deck needs the split's
counts) to learn each image's size before the first batch.
"""
import dataclasses
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

# Keeps the deck's shuffle apart from the streams' shuffle and augmentation seeds.
_DECK_SALT = 0xDEC

_SIZES: dict = {}  # (dataset dir, split) -> int64 [n, 2], read once per process


@dataclasses.dataclass(frozen=True)
class Grouping:
  """How a stream splits its examples into groups batched apart.

  of_sizes: int [n, 2] (height, width) of the images as stored -> int [n]
    group ids in [0, len(names)).
  names: each group's name, for messages.
  """
  of_sizes: Callable[[np.ndarray], np.ndarray]
  names: Sequence[str]

  @property
  def count(self) -> int:
    return len(self.names)

  def members(self, dataset_builder, split) -> np.ndarray:
    """int64 [n]: the group of each example of `split`, in read order."""
    return np.asarray(self.of_sizes(image_sizes(dataset_builder, split)), np.int64)


def image_sizes(dataset_builder, split) -> np.ndarray:
  """int64 [n, 2]: (height, width) of each image of `split` as stored, in the
  order the streams read it (shuffle_files=False).

  Images of a static shape need no reading; JPEG sizes come from their
  headers, other formats are decoded. Kept per process, so evaluating the
  same split again reads nothing.
  """
  key = (dataset_builder.data_dir, str(split))
  if key not in _SIZES:
    n = dataset_builder.info.splits[split].num_examples
    shape = dataset_builder.info.features["image"].shape
    if shape[0] and shape[1]:
      _SIZES[key] = np.tile(np.asarray(shape[:2], np.int64), (n, 1))
    else:
      _SIZES[key] = _read_sizes(dataset_builder, split)
  return _SIZES[key]


def _read_sizes(dataset_builder, split) -> np.ndarray:
  only_image = tfds.decode.PartialDecoding(
      {"image": True}, decoders={"image": tfds.decode.SkipDecoding()})
  ds = dataset_builder.as_dataset(split=split, shuffle_files=False,
                                  read_config=tfds.ReadConfig(try_autocache=False),
                                  decoders=only_image)
  ds = ds.map(lambda ex: _encoded_size(ex["image"]), num_parallel_calls=tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True  # Sizes line up with the examples in read order.
  sizes = [b for b in ds.batch(4096).with_options(options).as_numpy_iterator()]
  return np.concatenate(sizes).astype(np.int64) if sizes else np.zeros((0, 2), np.int64)


def members_only(dataset_builder, split, member: np.ndarray,
                 **as_dataset_kwargs) -> tf.data.Dataset:
  """The examples of `split` whose `member` (bool [n], read order) is True,
  decoded as `as_dataset` decodes them; the others' images (the image, the
  instance masks: what costs) are never decoded."""
  features = dataset_builder.info.features
  ds = dataset_builder.as_dataset(split=split, shuffle_files=False,
                                  decoders=_encoded_images(features),
                                  **as_dataset_kwargs)
  keep = tf.constant(member, tf.bool)
  return ds.enumerate().filter(lambda i, _: tf.gather(keep, i)).map(
      lambda _, ex: _decoded_images(features, ex), num_parallel_calls=tf.data.AUTOTUNE)


def _encoded_images(feature):
  """as_dataset decoders that leave every image feature encoded (None: none)."""
  if isinstance(feature, tfds.features.Image):
    return tfds.decode.SkipDecoding()
  if isinstance(feature, tfds.features.Sequence):
    return _encoded_images(feature.feature)
  if isinstance(feature, tfds.features.FeaturesDict):
    tree = {k: _encoded_images(f) for k, f in feature.items()}
    return {k: v for k, v in tree.items() if v is not None} or None
  return None


def _decoded_images(feature, value, in_sequence=False):
  """Decodes what _encoded_images left encoded (in a Sequence: every item)."""
  if isinstance(feature, tfds.features.Image):
    return (feature.decode_batch_example(value) if in_sequence
            else feature.decode_example(value))
  if isinstance(feature, tfds.features.Sequence):
    return _decoded_images(feature.feature, value, True)
  if isinstance(feature, tfds.features.FeaturesDict):
    return {k: _decoded_images(feature[k], v, in_sequence) for k, v in value.items()}
  return value


def _encoded_size(encoded: tf.Tensor) -> tf.Tensor:
  """int64 [2] (h, w) of an encoded image: from the header of a JPEG (the
  COCO builder's files), by decoding anything else."""
  is_jpeg = tf.strings.substr(encoded, 0, 2) == b"\xff\xd8"
  size = tf.cond(
      is_jpeg, lambda: tf.image.extract_jpeg_shape(encoded)[:2],
      lambda: tf.shape(tf.io.decode_image(encoded, expand_animations=False))[:2])
  return tf.cast(size, tf.int64)


class Deck:
  """The group of every training step (the module docstring's deck).

  Args:
    seed: the config's seed.
    counts: int [G], examples of each group in the split; at least one > 0.
  """

  def __init__(self, seed: int, counts: Sequence[int]):
    self.counts = np.asarray(counts, np.int64)
    self.size = int(self.counts.sum())
    self.ends = np.cumsum(self.counts)  # group g holds cards ends[g] - counts[g] ...
    self.key = int(seed) * 1_000_003 + _DECK_SALT

  def _cards(self, deck, position):
    """The cards at `position` (int64 scalar or [k]) of shuffled deck `deck`."""
    seed = tf.stack([tf.constant(self.key, tf.int64), tf.cast(deck, tf.int64)])
    return tf.random.experimental.index_shuffle(
        position, seed, tf.constant(self.size - 1, tf.int64))

  def group(self, step: tf.Tensor) -> tf.Tensor:
    """int64 []: the group of training step `step` (an int64 [] tensor)."""
    card = self._cards(step // self.size, step % self.size)
    return tf.reduce_sum(tf.cast(card >= tf.constant(self.ends), tf.int64))

  def steps_before(self, step: int) -> np.ndarray:
    """int64 [G]: how many of the steps 0 ... step-1 draw from each group."""
    deck, position = divmod(int(step), self.size)
    done = deck * self.counts
    if position:  # (index_shuffle refuses an empty vector)
      cards = self._cards(deck, tf.range(position, dtype=tf.int64)).numpy()
      done += np.bincount((cards[:, None] >= self.ends).sum(1),
                          minlength=len(self.counts))
    return done
