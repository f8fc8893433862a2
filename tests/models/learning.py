"""What the learning tests share: a fixed batch and Adam on it.

Each model's learning test trains it in train mode on one fixed batch and
asserts the loss falls by >= 90 % within a fixed number of steps.
"""
import jax
import numpy as np
import optax

from segjax import losses


def squares_batch(n=2, size=64, seed=0):
  """Noisy images with a class-1 square (bright in channel 0) and a class-2
  square (bright in channel 1); everything else is class 0."""
  rng = np.random.default_rng(seed)
  images = rng.normal(scale=0.3, size=(n, size, size, 3)).astype(np.float32)
  labels = np.zeros((n, size, size), np.int32)
  for i in range(n):
    for cls in (1, 2):
      side = rng.integers(12, 24)
      y, x = rng.integers(0, size - side, size=2)
      labels[i, y:y + side, x:x + side] = cls
      images[i, y:y + side, x:x + side, cls - 1] += 1.0
  return images, labels


def train_losses(model, images, labels, steps, learning_rate, variables=None,
                 loss=None):
  """Adam on one fixed batch (train mode, dropout on); the loss of every step.

  Args:
    model: a segjax model.
    images, labels: [N, H, W, 3] float32, [N, H, W] int32.
    steps, learning_rate: Adam's budget.
    variables: initial variables (default: model.init, rbg PRNG).
    loss: outputs -> scalar (default: pixel cross-entropy on "logits").
  """
  if variables is None:
    variables = jax.jit(lambda x: model.init(jax.random.key(0, impl="rbg"), x,
                                             train=False))(images)
  params = variables["params"]
  state = {k: v for k, v in variables.items() if k != "params"}
  if loss is None:
    cross_entropy = losses.make_loss("cross_entropy")
    loss = lambda outputs: cross_entropy(outputs, {"label": labels})
  tx = optax.adam(learning_rate)

  def loss_fn(params, state, rng):
    outputs, state = model.apply({"params": params, **state}, images, train=True,
                                 mutable=list(state), rngs={"dropout": rng})
    return loss(outputs), state

  @jax.jit
  def step(params, state, opt_state, i):
    rng = jax.random.fold_in(jax.random.key(1, impl="rbg"), i)
    (value, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state, value

  opt_state = tx.init(params)
  history = []
  for i in range(steps):
    params, state, opt_state, value = step(params, state, opt_state, i)
    history.append(float(value))
  return history
