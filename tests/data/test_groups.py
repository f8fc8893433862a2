"""Groups batched apart: the deck of step groups and the image sizes that
decide membership (the grouped streams: tests/data/test_instances.py)."""
import collections

import numpy as np
import tensorflow as tf

import fake_downloads as fake
from conftest import SMALL_DATASET
from segjax.data import builders, groups


def test_deck_keeps_proportions_and_counts_the_steps_before_any_step():
  counts = [5, 0, 2]  # an empty group is never dealt
  deck = groups.Deck(seed=3, counts=counts)
  dealt = [int(deck.group(tf.constant(t, tf.int64))) for t in range(21)]
  for start in (0, 7, 14):  # Every 7 steps (the deck's size): 5 and 2.
    assert collections.Counter(dealt[start:start + 7]) == {0: 5, 2: 2}
  for t in range(22):  # What a resumed stream skips, without dealing.
    np.testing.assert_array_equal(deck.steps_before(t),
                                  np.bincount(dealt[:t], minlength=3))
  other = groups.Deck(seed=4, counts=counts)
  assert [int(other.group(tf.constant(t, tf.int64))) for t in range(21)] != dealt


def test_image_sizes_from_headers_decoding_or_static_shapes(shapes_dir):
  image = np.zeros((5, 9, 3), np.uint8)
  for fmt in ("JPEG", "PNG"):
    size = groups._encoded_size(tf.constant(fake.image_bytes(image, fmt)))
    assert tuple(size.numpy()) == (5, 9), fmt
  # segjax_shapes/small declares 64 x 64 images: nothing is read.
  builder = builders.load_builder(SMALL_DATASET, shapes_dir)
  sizes = groups.image_sizes(builder, "test")
  assert sizes.shape == (8, 2) and (sizes == 64).all()
