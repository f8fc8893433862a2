"""Writes small `folder:<path>` datasets for tests."""
import os

import numpy as np
from PIL import Image


def write_folder(root, sizes, split, seed):
  """Images with a bright square (class 1) on a dark noisy ground (class 0)."""
  rng = np.random.default_rng(seed)
  os.makedirs(root / "images" / split, exist_ok=True)
  os.makedirs(root / "labels" / split, exist_ok=True)
  for i, (h, w) in enumerate(sizes):
    label = np.zeros((h, w), np.uint8)
    y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
    label[y:y + h // 3, x:x + w // 3] = 1
    label[:2] = 255  # an ignored border row pair
    image = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
    image[label == 1] += 150
    Image.fromarray(image).save(root / "images" / split / f"{i:03d}.png")
    Image.fromarray(label).save(root / "labels" / split / f"{i:03d}.png")
