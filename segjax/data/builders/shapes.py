"""`segjax_shapes`: a procedurally generated segmentation dataset.

No download: every example is drawn from `np.random.default_rng([seed,
split_id, index])`, so it is the same whichever process, order or machine
makes it. A scene is a textured, noisy background with 2–6 circles,
rectangles (some rotated) and triangles of random colour, size and position;
later shapes occlude earlier ones.

The task is meant to be learnable by a small U-Net on a CPU in minutes
(validation mIoU >= 0.9) yet not trivial: shapes always contrast with the
background and with the shapes they overlap, are 10–30 px in radius or
half-size at 128², and keep at least 70% of their area visible; the
background carries gradients, blobs, a stripe texture and pixel noise.

Features (H = W = `config.image_size`, 128 by default):

  image:             uint8 [H, W, 3]
  segmentation_mask: uint8 [H, W, 1]; 0 background, 1 circle, 2 rectangle,
                     3 triangle (`CLASS_NAMES`)
  objects:           a sequence of K visible instances, back to front:
    mask:  uint8 [K, H, W, 1], 1 on the instance's visible pixels
    bbox:  float32 [K, 4] (x1, y1, x2, y2) in pixels, tight around the visible
           mask: x1, y1 = first column/row, x2, y2 = last column/row + 1
    label: int64 [K], 0-based (0 circle, 1 rectangle, 2 triangle); the
           semantic id in `segmentation_mask` is label + 1
  image_id:          int64, the example's index within its split

Configs: "default" (128², 2000/200/200 train/validation/test) and "small"
(64², 48/16/8, for tests and smoke runs); `ShapesConfig` makes others.

Usage::

  from segjax.data import builders
  builder = builders.load_builder("segjax_shapes")   # generates on first use
  ds = builder.as_dataset(split="train")
"""
import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from segjax import errors

CLASS_NAMES = ("background", "circle", "rectangle", "triangle")
# ClassLabel names of `objects/label`: the semantic classes without background.
INSTANCE_NAMES = CLASS_NAMES[1:]
SPLITS = ("train", "validation", "test")

# Shape sizes at 128², scaled linearly with the image size.
_REFERENCE_SIZE = 128
_CIRCLE_RADIUS = (10.0, 28.0)
_RECT_HALF_SIZE = (10.0, 30.0)
_RECT_MAX_ASPECT = 2.5
_TRIANGLE_RADIUS = (16.0, 34.0)  # circumradius; triangles fill less area
# A shape is kept only if it leaves every earlier shape at least this
# fraction of its visible area: a sliver is no lesson, only label noise.
_MIN_VISIBLE_FRACTION = 0.7
_MIN_AREA = 60.0  # pixels at 128², scaled with the area
# Minimum RGB distance from what a shape covers, so that colour marks shapes.
_MIN_CONTRAST = 100.0
_PLACEMENT_TRIES = 10


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """A `segjax_shapes` variant.

  Attributes:
    image_size: side of the square images, >= 32 pixels.
    seed: base seed; example i of split s comes from default_rng([seed, s, i]).
    split_sizes: number of examples of (train, validation, test).
  """
  image_size: int = 128
  seed: int = 0
  split_sizes: tuple[int, int, int] = (2000, 200, 200)


class SegjaxShapes(tfds.core.GeneratorBasedBuilder):
  """Procedural shapes for semantic and instance segmentation (no download)."""

  name = "segjax_shapes"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # Nothing is downloaded, so there are no checksums to find. Saying so also
  # keeps tfds from locating this file through `importlib_resources`, which
  # tfds uses but does not install.
  url_infos = None
  BUILDER_CONFIGS = [
      ShapesConfig(
          name="default",
          description="128x128, seed 0, 2000/200/200 train/validation/test."),
      # Seconds to generate: for tests and smoke runs of the whole stack.
      ShapesConfig(
          name="small", image_size=64, split_sizes=(48, 16, 8),
          description="64x64, seed 0, 48/16/8 train/validation/test."),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    _check_config(config)
    h = w = config.image_size
    return self.dataset_info_from_configs(
        description=__doc__.split("\n\n")[0],
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(h, w, 3)),
            "segmentation_mask": tfds.features.Image(shape=(h, w, 1)),
            "objects": tfds.features.Sequence({
                "mask": tfds.features.Image(shape=(h, w, 1)),
                "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                "label": tfds.features.ClassLabel(names=INSTANCE_NAMES),
            }),
            "image_id": tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=("image", "segmentation_mask"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    sizes = self.builder_config.split_sizes
    return {
        split: self._generate_examples(split_id, sizes[split_id])
        for split_id, split in enumerate(SPLITS)
    }

  def _generate_examples(self, split_id: int, num_examples: int):
    config = self.builder_config
    for index in range(num_examples):
      scene = render_example(config.seed, split_id, index, config.image_size)
      yield index, {
          "image": scene["image"],
          "segmentation_mask": scene["semantic"][..., None],
          "objects": {
              "mask": scene["masks"][..., None].astype(np.uint8),
              "bbox": scene["boxes"],
              "label": scene["labels"] - 1,
          },
          "image_id": index,
      }


def _check_config(config: ShapesConfig) -> None:
  if config.image_size < 32:
    raise errors.ConfigError(
        f"segjax_shapes image_size={config.image_size} is too small; shapes "
        "need room. Use an image_size of at least 32 (the default is 128).")
  sizes = tuple(config.split_sizes)
  if len(sizes) != 3 or min(sizes) < 1:
    raise errors.ConfigError(
        f"segjax_shapes split_sizes={sizes} is invalid: give three positive "
        "counts for (train, validation, test), e.g. (2000, 200, 200).")


def render_example(seed: int, split_id: int, index: int,
                   image_size: int = 128) -> dict[str, np.ndarray]:
  """The scene of example `index` of split `split_id`; see `generate_scene`."""
  rng = np.random.default_rng([seed, split_id, index])
  return generate_scene(rng, image_size)


def generate_scene(rng: np.random.Generator,
                   image_size: int = 128) -> dict[str, np.ndarray]:
  """Draws one scene.

  Args:
    rng: the only source of randomness.
    image_size: side S of the square image.

  Returns:
    A dict with
      image:    uint8 [S, S, 3]
      semantic: uint8 [S, S]; 0 background, 1 circle, 2 rectangle, 3 triangle
      masks:    bool [K, S, S], visible pixels of each instance, K >= 1,
                back to front
      boxes:    float32 [K, 4] (x1, y1, x2, y2) pixels, x2/y2 exclusive
      labels:   int32 [K] semantic ids in 1..3
  """
  size = image_size
  scale = size / _REFERENCE_SIZE
  ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  background = _background(rng, xs, ys)
  canvas = background.copy()
  owner = np.full((size, size), -1, np.int32)  # instance drawn on top, or -1
  areas, colours, labels = [], [], []
  min_area = _MIN_AREA * scale * scale

  for _ in range(rng.integers(2, 7)):
    for _ in range(_PLACEMENT_TRIES):
      label = int(rng.integers(1, 4))
      mask = _draw_shape(rng, label, xs, ys, scale)
      area = mask.sum()
      if area < min_area or not _keeps_others_visible(mask, owner, areas):
        continue
      covered = [colours[k] for k in np.unique(owner[mask]) if k >= 0]
      colour = _contrasting_colour(rng, background[mask].mean(0), covered)
      owner[mask] = len(labels)
      areas.append(area)
      colours.append(colour)
      labels.append(label)
      canvas[mask] = _shade(rng, colour, xs[mask], ys[mask], scale)
      break

  # Pixel noise over everything, so edges are not perfectly clean.
  canvas += rng.normal(0.0, rng.uniform(3.0, 10.0), canvas.shape)
  image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)

  instances = np.arange(len(labels))
  masks = owner[None] == instances[:, None, None]
  keep = masks.any(axis=(1, 2))  # Drop instances that ended fully occluded.
  masks, labels = masks[keep], np.asarray(labels, np.int32)[keep]
  semantic = np.zeros((size, size), np.uint8)
  for mask, label in zip(masks, labels):
    semantic[mask] = label
  return dict(image=image, semantic=semantic, masks=masks,
              boxes=_boxes(masks), labels=labels)


def _background(rng, xs, ys):
  """float32 [S, S, 3] in about 0..255: gradient + blobs + stripes."""
  size = xs.shape[0]
  angle = rng.uniform(0, 2 * np.pi)
  t = (np.cos(angle) * xs + np.sin(angle) * ys) / size  # roughly 0..1
  t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
  c0, c1 = rng.uniform(40, 215, (2, 3)).astype(np.float32)
  image = c0 + t[..., None] * (c1 - c0)
  # Low-frequency blobs: a coarse random grid, bilinearly upsampled.
  cells = int(rng.integers(3, 7))
  interp = _linear_interp_matrix(cells, size)
  grid = rng.normal(0.0, 1.0, (cells, cells, 3)).astype(np.float32)
  blobs = np.einsum("hi,ijc->hjc", interp, grid, optimize=True)
  blobs = np.einsum("hjc,wj->hwc", blobs, interp, optimize=True)
  image += rng.uniform(10.0, 30.0) * blobs
  # A faint oriented stripe texture.
  angle = rng.uniform(0, np.pi)
  period = rng.uniform(4.0, 16.0) * size / _REFERENCE_SIZE
  phase = (np.cos(angle) * xs + np.sin(angle) * ys) * (2 * np.pi / period)
  image += rng.uniform(3.0, 12.0) * np.sin(phase)[..., None]
  return image.astype(np.float32)


def _linear_interp_matrix(cells: int, size: int) -> np.ndarray:
  """[size, cells] weights that bilinearly resample `cells` values to `size`."""
  pos = (np.arange(size) + 0.5) / size * (cells - 1)
  return np.maximum(0.0, 1.0 - np.abs(pos[:, None] - np.arange(cells)))


def _draw_shape(rng, label, xs, ys, scale):
  """bool [S, S] mask of a random circle (1), rectangle (2) or triangle (3)."""
  size = xs.shape[0]
  cx, cy = rng.uniform(0.12, 0.88, 2) * size
  dx, dy = xs - cx, ys - cy
  if label == 1:
    radius = rng.uniform(*_CIRCLE_RADIUS) * scale
    return dx * dx + dy * dy <= radius * radius
  if label == 2:
    half_w = rng.uniform(*_RECT_HALF_SIZE) * scale
    lo = max(_RECT_HALF_SIZE[0] * scale, half_w / _RECT_MAX_ASPECT)
    hi = min(_RECT_HALF_SIZE[1] * scale, half_w * _RECT_MAX_ASPECT)
    half_h = rng.uniform(lo, hi)
    # Half the rectangles are axis-aligned, as in most real scenes.
    angle = 0.0 if rng.random() < 0.5 else rng.uniform(0, np.pi / 2)
    u = np.cos(angle) * dx + np.sin(angle) * dy
    v = -np.sin(angle) * dx + np.cos(angle) * dy
    return (np.abs(u) <= half_w) & (np.abs(v) <= half_h)
  # Triangle: vertices near 120° apart on a circle, jittered so that they are
  # not all equilateral but never degenerate slivers.
  radius = rng.uniform(*_TRIANGLE_RADIUS) * scale
  angles = (rng.uniform(0, 2 * np.pi) + np.deg2rad(
      np.array([0.0, 120.0, 240.0]) + rng.uniform(-25, 25, 3)))
  radii = radius * rng.uniform(0.85, 1.0, 3)
  vx, vy = radii * np.cos(angles), radii * np.sin(angles)
  # Counter-clockwise vertices: inside = left of (or on) every edge.
  inside = np.ones(xs.shape, bool)
  for i in range(3):
    j = (i + 1) % 3
    cross = (vx[j] - vx[i]) * (dy - vy[i]) - (vy[j] - vy[i]) * (dx - vx[i])
    inside &= cross >= 0
  return inside


def _keeps_others_visible(mask, owner, areas):
  """Whether drawing `mask` leaves each earlier shape enough visible area."""
  if not areas:
    return True
  visible = np.bincount(owner[~mask].ravel() + 1, minlength=len(areas) + 1)[1:]
  return bool(np.all(visible >= _MIN_VISIBLE_FRACTION * np.asarray(areas)))


def _contrasting_colour(rng, background_mean, covered):
  """An RGB colour far from the background and from the shapes it covers."""
  avoid = [background_mean] + list(covered)
  best, best_distance = None, -1.0
  for _ in range(30):
    colour = rng.uniform(0, 255, 3).astype(np.float32)
    distance = min(np.linalg.norm(colour - a) for a in avoid)
    if distance >= _MIN_CONTRAST:
      return colour
    if distance > best_distance:
      best, best_distance = colour, distance
  return best


def _shade(rng, colour, xs, ys, scale):
  """float32 [N, 3]: the colour under a mild linear light gradient."""
  angle = rng.uniform(0, 2 * np.pi)
  ramp = (np.cos(angle) * xs + np.sin(angle) * ys) / (30.0 * scale)
  ramp -= ramp.mean()
  return colour + rng.uniform(4.0, 12.0) * ramp[:, None]


def _boxes(masks: np.ndarray) -> np.ndarray:
  """float32 [K, 4] (x1, y1, x2, y2) tight around bool masks [K, S, S]."""
  boxes = np.zeros((len(masks), 4), np.float32)
  for k, mask in enumerate(masks):
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    boxes[k] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
  return boxes
