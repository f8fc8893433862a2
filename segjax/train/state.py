"""The train state pytree and how it is created.

The state holds arrays only (no functions), so it can be donated to jit,
replicated with pmap and saved by orbax as it is: the checkpoint item
`state` is this pytree.
"""
from typing import Any, Dict, Tuple

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training.

  Attributes:
    step: int32 scalar, number of updates applied.
    params: model parameters (float32).
    batch_stats: BatchNorm running statistics ({} for models without BN).
    opt_state: optax state of the optimizer.
    nonfinite: int32 scalar, steps whose loss or gradient was NaN/Inf; such
      steps leave params untouched, and the loop stops or skips (policy).
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  nonfinite: jax.Array

  def to_dict(self) -> Dict[str, Any]:
    return dict(step=self.step, params=self.params, batch_stats=self.batch_stats,
                opt_state=self.opt_state, nonfinite=self.nonfinite)


def init_state(model, tx: optax.GradientTransformation, rng: jax.Array,
               image_shape: Tuple[int, int, int]) -> TrainState:
  """Initialises parameters and optimizer state.

  Args:
    model: flax module following the model contract.
    tx: optax GradientTransformation.
    rng: PRNG key.
    image_shape: (H, W, C) of one input image.
  """
  images = jnp.zeros((1, *image_shape), jnp.float32)
  variables = model.init({"params": rng, "dropout": rng}, images, train=False)
  params = variables["params"]
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      batch_stats=variables.get("batch_stats", {}),
      opt_state=tx.init(params), nonfinite=jnp.zeros((), jnp.int32))
