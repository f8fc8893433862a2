"""The VGG-based seed models learn: one fixed batch, loss down >= 90 %.

fcn32s/16s/8s, segnet, deconvnet, deeplab_v1 and parsenet, each at small
widths and one conv per VGG stage (the layer types are the paper's; only the
sizes shrink), trained with Adam on two 64 x 64 images whose two coloured
squares (classes 1 and 2) fill quadrants of the image. Quadrants keep the
labels constant on every model's coarsest grid (FCN-32s predicts 32 x 32
cells), so each model can fit the batch almost exactly and a >= 90 % drop of
the training loss is a fair bar for all of them.
"""
import numpy as np
import pytest

from segjax import models

from learning import train_losses  # pylint: disable=import-error

SMALL = dict(widths=(8, 8, 16, 16, 16), stage_sizes=(1,) * 5)
# name -> (options, steps, learning rate). FCNs use the "same" alignment,
# whose 32-pixel cells coincide with the quadrants (Caffe's sit 99 pixels
# off the image origin); dropout off, so the loss of a fixed batch is smooth.
CASES = {
    "fcn32s": (dict(SMALL, fc_width=16, alignment="same", dropout=0.0), 60,
               3e-2),
    "fcn16s": (dict(SMALL, fc_width=16, alignment="same", dropout=0.0), 60,
               3e-2),
    "fcn8s": (dict(SMALL, fc_width=16, alignment="same", dropout=0.0), 60,
              3e-2),
    # Two convs in stage 1, so decoder stage 1 has a conv before the
    # classifier (the paper's conv1_2_D).
    "segnet": (dict(SMALL, stage_sizes=(2, 1, 1, 1, 1)), 60, 3e-2),
    # fc6 is 1 x 1 here (64 pixels pad to 224), so its BatchNorm sees two
    # values per channel; a smaller rate keeps it from collapsing.
    "deconvnet": (dict(SMALL, fc_width=16), 100, 6e-3),
    "deeplab_v1": (dict(SMALL, fc_width=16, dropout=0.0), 60, 1e-2),
    "parsenet": (dict(SMALL, fc_width=16, dropout=0.0), 100, 1e-2),
}


def quadrant_squares(size=64, seed=0):
  """Two noisy images; classes 1 and 2 fill two quadrants, coloured."""
  rng = np.random.default_rng(seed)
  images = rng.normal(scale=0.3, size=(2, size, size, 3)).astype(np.float32)
  labels = np.zeros((2, size, size), np.int32)
  half = size // 2
  quadrants = [((0, 0), (1, 1)), ((0, 1), (1, 0))]
  for i, placement in enumerate(quadrants):
    for c, (qy, qx) in enumerate(placement, 1):
      window = np.s_[i, qy * half:(qy + 1) * half, qx * half:(qx + 1) * half]
      labels[window] = c
      images[window][..., c - 1] += 1.5
  return images, labels


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_learns_quadrant_squares(name):
  options, steps, learning_rate = CASES[name]
  images, labels = quadrant_squares()
  model = models.build(name, 3, **options)
  history = train_losses(model, images, labels, steps, learning_rate)
  # The mean of the last steps: Adam's steps make single losses jumpy.
  assert np.mean(history[-5:]) <= 0.1 * history[0], (name, history[::10])
