"""The dense CRF as an inference option (the papers' "DeepLab-CRF").

DeepLab v1 and v2 refine their upsampled logits with a fully connected CRF
at test time (segjax.ops.dense_crf). The CRF's appearance kernel needs the
RGB image in 0..255: models take it as `crf_image`, or rebuild it from the
normalised input as images * std + mean.
"""
from typing import Any, Dict, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from segjax.errors import ConfigError
from segjax.ops import dense_crf

Array = jax.Array

# The input normalisation of ImageNet-initialised backbones (0..255 RGB), as
# segjax.data.normalization's default (repeated, so that the models do not
# depend on the input package).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def check_crf_options(model: str, crf_kwargs: Optional[Mapping[str, Any]],
                      defaults: Mapping[str, Any], mean: Sequence[float],
                      std: Sequence[float]) -> None:
  """ConfigError naming `model` for unknown CRF keys or a bad mean/std."""
  unknown = set(crf_kwargs or {}) - set(defaults) - {"method"}
  if unknown:
    raise ConfigError(f"{model}: crf_kwargs has unknown keys {sorted(unknown)}; "
                      f"valid: {sorted(defaults) + ['method']}.")
  if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
    raise ConfigError(f"{model}: mean and std must be 3 numbers (std > 0), got "
                      f"{tuple(mean)}, {tuple(std)}.")


def refine_with_crf(logits: Array, images: Array, crf_image: Optional[Array],
                    mean: Sequence[float], std: Sequence[float],
                    crf_kwargs: Mapping[str, Any]) -> Dict[str, Array]:
  """Mean-field CRF on the logits.

  Args:
    logits: [N, H, W, K] float32 at the image resolution.
    images: [N, H, W, 3] the normalised network input.
    crf_image: [N, H, W, 3] RGB in 0..255 (uint8 or float), or None to use
      images * std + mean.
    mean, std: the input normalisation.
    crf_kwargs: dense_crf's options.

  Returns:
    {"logits": the CRF's log-marginals [N, H, W, K], "unary_logits": logits}.
  """
  if crf_image is None:
    crf_image = images.astype(jnp.float32) * jnp.asarray(std) + jnp.asarray(mean)
  if crf_image.shape != (*images.shape[:3], 3):
    raise ValueError(f"crf_image must be [N, H, W, 3] like images {images.shape}, "
                     f"got {crf_image.shape}")
  # Normalisation round trips can leave values just outside 0..255.
  probs = dense_crf(logits, jnp.clip(crf_image.astype(jnp.float32), 0, 255), **crf_kwargs)
  return {"logits": jnp.log(jnp.maximum(probs, 1e-30)), "unary_logits": logits}


def normalisation_options(model: str, config) -> Dict[str, Any]:
  """The `mean`/`std` options of a model that rebuilds the CRF's image from
  its normalised input, taken from the config's `augment.mean/std`: the one
  normalisation the input pipeline applied. {} for other models.

  Raises:
    ConfigError: model_kwargs gives a mean or std that differs from augment's.
  """
  from segjax import models  # pylint: disable=import-outside-toplevel (a cycle)
  options = models._options(models.MODELS[model]) if model in models.MODELS else None
  if not options or "mean" not in options or "std" not in options:
    return {}
  wanted = {"mean": tuple(float(v) for v in config.augment.mean),
            "std": tuple(float(v) for v in config.augment.std)}
  for key, value in wanted.items():
    given = config.model_kwargs.get(key)
    if given is not None and tuple(float(v) for v in given) != value:
      raise ConfigError(
          f"model_kwargs.{key}={tuple(given)} differs from augment.{key}={value}, "
          f"the normalisation the input pipeline applies; {model}'s CRF "
          f"de-normalises its input with augment.{key}: leave model_kwargs.{key} out.")
  return wanted
