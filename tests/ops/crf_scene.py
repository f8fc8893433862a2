"""A synthetic noisy scene for dense CRF tests: regions of distinct colours."""
import numpy as np


def noisy_scene(h, w, num_classes=4, accuracy=0.6, seed=0):
  """Returns (labels [H, W] int, image [H, W, 3] uint8, logits [H, W, K] float32).

  The image has one colour per class region (plus pixel noise); the unary
  logits put their maximum on the true label for ~`accuracy` of the pixels
  and on a random wrong label elsewhere.
  """
  rng = np.random.RandomState(seed)
  ys, xs = np.mgrid[0:h, 0:w]
  labels = np.zeros((h, w), np.int64)
  labels[(xs > w * 0.45) & (ys < h * 0.6)] = 1
  labels[(xs - w * 0.3) ** 2 + (ys - h * 0.7) ** 2 < (0.2 * min(h, w)) ** 2] = 2
  labels[(ys > h * 0.75) & (xs > w * 0.6)] = 3 % num_classes
  palette = rng.randint(0, 256, (num_classes, 3))
  palette = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [220, 220, 60]])[:num_classes]
  image = np.clip(palette[labels] + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
  right = rng.rand(h, w) < accuracy
  wrong = (labels + rng.randint(1, num_classes, (h, w))) % num_classes
  noisy = np.where(right, labels, wrong)
  logits = rng.normal(0, 0.3, (h, w, num_classes)).astype(np.float32)
  logits[ys, xs, noisy] += 1.0
  return labels, image, logits
