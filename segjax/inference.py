"""Inference on image files: whole-image prediction, colour masks, overlays.

The model runs on the image at its own size (fully convolutional models
accept any size; one compilation per distinct size), or, when the config
sets `eval.resize_to`, on the image resized to that size, with the class
probabilities resized back to the image.
"""
import functools
import os

import jax
import numpy as np
from PIL import Image, UnidentifiedImageError

from segjax import viz
from segjax.errors import DataError
from segjax.ops import resize
from segjax.train import steps


def read_image(path):
  """Reads an image file as uint8 [H, W, 3].

  Grayscale is replicated to three channels and an alpha channel is dropped;
  anything unreadable raises DataError naming the file.
  """
  if not os.path.isfile(path):
    raise DataError(f"image {path!r} does not exist; check the path")
  try:
    with Image.open(path) as img:
      img.load()
      rgb = img.convert("RGB")
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise DataError(f"image {path!r} cannot be decoded ({e}); is it a valid "
                    "PNG/JPEG file? Re-export it or leave it out") from e
  return np.asarray(rgb, np.uint8)


def normalize(image, mean, std):
  """uint8 [H,W,3] -> float32 [H,W,3], (x - mean) / std per channel."""
  return (image.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(
      std, np.float32)


def predict_probabilities(model, variables, images):
  """Class probabilities float32 [N,H,W,K] for normalised images [N,H,W,3]."""
  return _compiled_predict(model)(variables, images)


@functools.lru_cache(maxsize=8)
def _compiled_predict(model):
  return jax.jit(functools.partial(steps.predict_step, model=model))


def predict_files(trainer, state, paths, output_dir):
  """Writes `<name>_mask.png` (colours), `<name>_overlay.png` and
  `<name>_labels.png` (class indices) for each image file.

  Returns:
    list of written file paths.
  """
  config = trainer.config
  host = trainer.par.host_state(state)
  variables = {"params": host.params, "batch_stats": host.batch_stats}
  colours = viz.palette(config.num_classes)
  os.makedirs(output_dir, exist_ok=True)
  written = []
  for path in paths:
    image = read_image(path)
    x = normalize(image, config.augment.mean, config.augment.std)[None]
    resize_to = config.eval.get("resize_to")
    if resize_to:  # Run at the model's size, answer at the image's.
      x = np.asarray(resize(x, tuple(resize_to)))
    probs = predict_probabilities(trainer.model, variables, x)
    if probs.shape[1:3] != image.shape[:2]:
      probs = resize(probs, image.shape[:2])
    labels = np.asarray(np.argmax(probs[0], axis=-1), np.uint8)
    stem = os.path.join(output_dir, os.path.splitext(os.path.basename(path))[0])
    outputs = {f"{stem}_mask.png": viz.colorize(labels, colours),
               f"{stem}_overlay.png": viz.overlay(image, labels, colours),
               f"{stem}_labels.png": labels}
    for out_path, array in outputs.items():
      viz.save_png(out_path, array)
      written.append(out_path)
  return written
