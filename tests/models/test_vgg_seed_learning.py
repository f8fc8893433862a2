"""The VGG-based seed models learn: one fixed batch, loss down >= 90 %.

fcn32s/16s/8s, segnet, deconvnet, deeplab_v1 and parsenet, each at small
widths and one conv per VGG stage (the layer types are the paper's; only the
sizes shrink), trained with Adam on two 64 x 64 images whose two coloured
squares (classes 1 and 2) fill quadrants of the image. Quadrants keep the
labels constant on every model's coarsest grid (FCN-32s predicts 32 x 32
cells), so each model can fit the batch almost exactly and a >= 90 % drop of
the training loss is a fair bar for all of them.
"""
import jax
import numpy as np
import optax
import pytest

from segjax import losses
from segjax import models

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


def make_key(seed):
  return jax.random.key(seed, impl="rbg")


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


def train_losses(model, images, labels, steps, learning_rate):
  """Adam on one fixed batch (train mode); the loss before every step."""
  variables = jax.jit(lambda x: model.init(make_key(0), x, train=False))(
      images)
  params = variables["params"]
  state = {k: v for k, v in variables.items() if k != "params"}
  loss_of = losses.make_loss("cross_entropy")
  tx = optax.adam(learning_rate)

  def loss_fn(params, state, rng):
    outputs, state = model.apply({"params": params, **state}, images,
                                 train=True, mutable=list(state),
                                 rngs={"dropout": rng})
    return loss_of(outputs, {"label": labels}), state

  @jax.jit
  def step(params, state, opt_state, i):
    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, state, jax.random.fold_in(make_key(1), i))
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state, loss

  opt_state = tx.init(params)
  history = []
  for i in range(steps):
    params, state, opt_state, loss = step(params, state, opt_state, i)
    history.append(float(loss))
  return history


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_learns_quadrant_squares(name):
  options, steps, learning_rate = CASES[name]
  images, labels = quadrant_squares()
  model = models.build(name, 3, **options)
  history = train_losses(model, images, labels, steps, learning_rate)
  # The mean of the last steps: Adam's steps make single losses jumpy.
  assert np.mean(history[-5:]) <= 0.1 * history[0], (name, history[::10])
