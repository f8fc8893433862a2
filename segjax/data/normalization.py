"""Per-channel image normalisation, in numpy and free of TensorFlow.

The input pipelines normalise with `segjax.data.ops.normalize` (tf.data);
`segjax.inference` reads image files without TensorFlow and normalises them
here. Both check the statistics with `check_stats` and compute
float32 (x - mean) / std with the same two float32 operations, so a file
and the same image from a dataset reach the model bit for bit alike
(tests/data/test_transforms.py compares them).
"""
from collections.abc import Sequence

import numpy as np

from segjax.errors import ConfigError

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, 0..255 pixel scale
IMAGENET_STD = (58.395, 57.12, 57.375)


def check_stats(mean: Sequence[float], std: Sequence[float]
                ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) as tuples of 3 floats.

  Raises:
    ConfigError: unless both have one value per RGB channel and std > 0.
  """
  mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
  if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
    raise ConfigError(
        f"mean={mean} and std={std} need one value per RGB channel, std "
        "positive, on the image's 0..255 scale (config augment.mean / "
        "augment.std)")
  return mean, std


def normalize(image: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
  """image [H, W, 3] (uint8 or float) -> float32 (image - mean) / std."""
  mean, std = check_stats(mean, std)
  return ((np.asarray(image).astype(np.float32) - np.asarray(mean, np.float32))
          / np.asarray(std, np.float32))
