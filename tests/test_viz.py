"""Palettes, coloured masks, overlays and PNG output."""
import numpy as np
import pytest
from PIL import Image

from segjax import errors
from segjax import viz


def _voc_colour(c):
  """The VOC devkit's bit loop, written out per class."""
  r = g = b = 0
  for j in range(8):
    r |= ((c >> 0) & 1) << (7 - j)
    g |= ((c >> 1) & 1) << (7 - j)
    b |= ((c >> 2) & 1) << (7 - j)
    c >>= 3
  return (r, g, b)


def test_palette_matches_voc():
  colours = viz.palette(256)
  assert colours.shape == (256, 3) and colours.dtype == np.uint8
  assert [tuple(c) for c in colours[:5]] == [
      (0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128)]
  assert tuple(colours[15]) == (192, 128, 128)  # VOC "person".
  for c in (0, 7, 21, 100, 255):
    assert tuple(colours[c]) == _voc_colour(c)
  assert len({tuple(c) for c in colours}) == 256  # All distinct.
  np.testing.assert_array_equal(viz.palette(4), colours[:4])
  with pytest.raises(errors.ConfigError):
    viz.palette(0)


def test_colorize_looks_up_palette_and_paints_ignore_white():
  mask = np.array([[0, 1], [2, 255]], np.int32)
  out = viz.colorize(mask, viz.palette(3))
  assert out.shape == (2, 2, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[0, 0], (0, 0, 0))
  np.testing.assert_array_equal(out[0, 1], (128, 0, 0))
  np.testing.assert_array_equal(out[1, 0], (0, 128, 0))
  np.testing.assert_array_equal(out[1, 1], viz.IGNORE_COLOR)
  black = viz.colorize(mask[..., None], viz.palette(3), ignore_color=(0, 0, 0))
  np.testing.assert_array_equal(black[1, 1], (0, 0, 0))


def test_colorize_rejects_ids_outside_palette():
  with pytest.raises(errors.DataError, match="outside"):
    viz.colorize(np.array([[0, 4]]), viz.palette(4))
  with pytest.raises(errors.DataError, match="outside"):
    viz.colorize(np.array([[-1, 0]]), viz.palette(4))
  with pytest.raises(errors.DataError, match="argmax"):
    viz.colorize(np.zeros((2, 2), np.float32))


def test_overlay_blends_and_keeps_ignored_pixels():
  image = np.full((2, 3, 3), 100, np.uint8)
  mask = np.array([[0, 1, 255], [2, 1, 0]])
  colours = viz.palette(3)
  np.testing.assert_array_equal(viz.overlay(image, mask, colours, 0.0), image)
  full = viz.overlay(image, mask, colours, 1.0)
  np.testing.assert_array_equal(full[0, 1], (128, 0, 0))
  np.testing.assert_array_equal(full[0, 2], (100, 100, 100))  # Ignored.
  half = viz.overlay(image, mask, colours, 0.5)
  assert half.dtype == np.uint8
  np.testing.assert_array_equal(half[0, 1], (114, 50, 50))
  np.testing.assert_array_equal(half[0, 0], (50, 50, 50))
  grey = viz.overlay(image[..., 0], mask, colours, 0.5)
  np.testing.assert_array_equal(grey, half)


def test_overlay_rejects_bad_inputs():
  image = np.zeros((2, 2, 3), np.uint8)
  with pytest.raises(errors.DataError, match="differ in size"):
    viz.overlay(image, np.zeros((3, 2), np.int32))
  with pytest.raises(errors.DataError, match="uint8"):
    viz.overlay(image.astype(np.float32), np.zeros((2, 2), np.int32))
  with pytest.raises(errors.ConfigError):
    viz.overlay(image, np.zeros((2, 2), np.int32), alpha=1.5)


def test_save_png_round_trips(tmp_path):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (5, 7, 3), np.uint8)
  path = tmp_path / "nested" / "rgb.png"
  viz.save_png(path, rgb)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), rgb)
  grey = rng.integers(0, 256, (5, 7, 1), np.uint8)
  viz.save_png(tmp_path / "grey.png", grey)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "grey.png")),
                                grey[..., 0])
  viz.save_png(tmp_path / "bool.png", np.eye(3, dtype=bool))
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "bool.png")),
                                np.eye(3) * 255)


def test_save_png_palette_mode_keeps_ids(tmp_path):
  mask = np.array([[0, 1, 2], [3, 255, 1]], np.uint8)
  viz.save_png(tmp_path / "mask.png", mask, viz.palette(256))
  with Image.open(tmp_path / "mask.png") as image:
    assert image.mode == "P"
    np.testing.assert_array_equal(np.asarray(image), mask)
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")),
                                  viz.palette(256)[mask])


def test_save_png_rejects_floats(tmp_path):
  with pytest.raises(errors.DataError, match="uint8"):
    viz.save_png(tmp_path / "x.png", np.zeros((2, 2, 3), np.float32))
  with pytest.raises(errors.DataError, match="palette"):
    viz.save_png(tmp_path / "x.png", np.zeros((2, 2, 3), np.uint8),
                 viz.palette(4))


# Instances. Detection i's default colour is palette(256)[i + 1].
RED, GREEN = (128, 0, 0), (0, 128, 0)


def _scene(height=80, width=120, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3),
                                              np.uint8)


def _box_mask(height, width, rows, cols):
  mask = np.zeros((height, width), bool)
  mask[rows[0]:rows[1], cols[0]:cols[1]] = True
  return mask


def _blend(pixels, colour, alpha):
  blended = (1 - alpha) * pixels.astype(np.float64) + alpha * np.asarray(colour)
  return np.rint(blended).astype(np.uint8)


def test_draw_instances_draws_mask_outline_and_label_only():
  image = _scene()
  mask = _box_mask(80, 120, (40, 60), (50, 80))
  out = viz.draw_instances(
      image, np.array([[40., 30., 90., 70.]]), np.array([1]),
      np.array([0.9]), mask[None], ["background", "cat"], alpha=0.5)
  assert out.shape == image.shape and out.dtype == np.uint8
  # The mask is blended with the instance colour, exactly.
  np.testing.assert_array_equal(out[mask], _blend(image[mask], RED, 0.5))
  # Outline on the box's edge pixels: rows 30 and 69, columns 40 and 89.
  for y, x in ((30, 60), (69, 60), (50, 40), (50, 89), (30, 40), (69, 89)):
    np.testing.assert_array_equal(out[y, x], RED, err_msg=f"{(y, x)}")
  # The label's patch sits right above the box's top-left corner.
  np.testing.assert_array_equal(out[29, 40], RED)
  label = out[:30, 40:] != image[:30, 40:]
  assert label.any(axis=-1).sum() > 50  # Patch and text, not a stray pixel.
  # Everything else is untouched: left of the box, below it, and the box's
  # inside off the mask (the outline is at most 2 px wide).
  np.testing.assert_array_equal(out[:, :40], image[:, :40])
  np.testing.assert_array_equal(out[70:], image[70:])
  inside = np.zeros((80, 120), bool)
  inside[32:68, 42:88] = True
  inside &= ~mask
  np.testing.assert_array_equal(out[inside], image[inside])
  assert not np.shares_memory(out, image)


def test_draw_instances_label_text_uses_class_names():
  image = np.full((60, 100, 3), 90, np.uint8)
  boxes, classes = np.array([[10., 30., 50., 50.]]), np.array([1])
  empty = np.zeros((1, 60, 100), bool)
  cat = viz.draw_instances(image, boxes, classes, np.array([0.9]), empty,
                           ["bg", "cat"])
  dog = viz.draw_instances(image, boxes, classes, np.array([0.9]), empty,
                           ["bg", "a much longer name"])
  assert (cat != dog).any()
  # No names (or an id past the end): the id is shown, still a label.
  bare = viz.draw_instances(image, boxes, classes, np.array([0.9]), empty)
  short = viz.draw_instances(image, boxes, classes, np.array([0.9]), empty,
                             ["bg"])
  np.testing.assert_array_equal(bare, short)
  assert (bare[:30] != image[:30]).any()


def test_draw_instances_without_masks_draws_boxes_and_labels_alone():
  """A box-only detector (masks None): as with empty masks, nothing blended."""
  image = _scene(seed=2)
  boxes = np.array([[10., 30., 50., 50.], [60., 20., 90., 70.]])
  classes, scores = np.array([1, 2]), np.array([0.9, 0.3])
  empty = np.zeros((2,) + image.shape[:2], bool)
  out = viz.draw_instances(image, boxes, classes, scores, None, ["bg", "a", "b"])
  np.testing.assert_array_equal(
      out, viz.draw_instances(image, boxes, classes, scores, empty, ["bg", "a", "b"]))
  assert (out != image).any() and not np.shares_memory(out, image)
  with pytest.raises(errors.DataError, match="classes"):
    viz.draw_instances(image, boxes, classes[:1], scores, None)


def test_draw_instances_skips_low_scores_and_class_zero():
  image = _scene(seed=1)
  # Box 0's label goes inside it (no room above): keep its mask lower down.
  masks = np.stack([_box_mask(80, 120, (20, 30), (10, 20)),
                    _box_mask(80, 120, (50, 60), (40, 50))])
  boxes = np.array([[5., 5., 25., 35.], [35., 45., 55., 65.]])
  classes, scores = np.array([2, 0]), np.array([0.3, 0.9])
  out = viz.draw_instances(image, boxes, classes, scores, masks)
  np.testing.assert_array_equal(out, image)
  low = viz.draw_instances(image, boxes, classes, scores, masks,
                           score_thresh=0.3)  # score >= thresh is drawn.
  np.testing.assert_array_equal(low[masks[0]],
                                _blend(image[masks[0]], RED, 0.5))
  np.testing.assert_array_equal(low[40:], image[40:])  # Class 0: never.
  nan = viz.draw_instances(image, boxes, classes, np.array([np.nan, 0.9]),
                           masks, score_thresh=0.0)
  np.testing.assert_array_equal(nan, image)


def test_draw_instances_tells_touching_objects_of_one_class_apart():
  image = np.full((40, 60, 3), 200, np.uint8)
  left = _box_mask(40, 60, (10, 30), (10, 30))
  right = _box_mask(40, 60, (10, 30), (30, 50))
  out = viz.draw_instances(
      image, np.array([[10., 10., 30., 30.], [30., 10., 50., 30.]]),
      np.array([3, 3]), np.array([0.9, 0.8]), np.stack([left, right]),
      alpha=1.0)
  np.testing.assert_array_equal(out[20, 20], RED)
  np.testing.assert_array_equal(out[20, 40], GREEN)
  custom = viz.draw_instances(
      image, np.array([[10., 10., 30., 30.], [30., 10., 50., 30.]]),
      np.array([3, 3]), np.array([0.9, 0.8]), np.stack([left, right]),
      alpha=1.0, colours=[[255, 0, 0], [0, 0, 255]])
  np.testing.assert_array_equal(custom[20, 20], (255, 0, 0))
  np.testing.assert_array_equal(custom[20, 40], (0, 0, 255))


def test_draw_instances_puts_the_best_score_on_top():
  image = np.full((40, 60, 3), 50, np.uint8)
  mask = _box_mask(40, 60, (15, 30), (15, 40))
  box = [10., 10., 45., 35.]
  # Detection 1 scores higher: its colour (GREEN) wins mask and outline.
  out = viz.draw_instances(image, np.array([box, box]), np.array([1, 1]),
                           np.array([0.6, 0.9]), np.stack([mask, mask]),
                           alpha=1.0)
  np.testing.assert_array_equal(out[20, 20], GREEN)
  np.testing.assert_array_equal(out[34, 30], GREEN)  # Bottom edge.
  flipped = viz.draw_instances(image, np.array([box, box]), np.array([1, 1]),
                               np.array([0.9, 0.6]), np.stack([mask, mask]),
                               alpha=1.0)
  np.testing.assert_array_equal(flipped[20, 20], RED)
  np.testing.assert_array_equal(flipped[34, 30], RED)


def test_draw_instances_survives_boxes_outside_the_image():
  image = _scene(40, 100, seed=2)
  boxes = np.array([[-10., -10., 20., 20.],     # Partly outside: clipped.
                    [100., 100., 200., 200.],   # Wholly outside: no outline.
                    [-1e9, -1e9, 1e9, 1e9],     # Huge: the image's border.
                    [np.nan, 0., 10., np.inf],  # Not finite: no outline.
                    [90., 30., 120., 60.]])     # Past the bottom-right.
  masks = np.zeros((5, 40, 100), bool)
  masks[0, 15:19, 5:10] = True
  masks[1, 30:, 30:40] = True  # A mask still shows without a box.
  out = viz.draw_instances(image, boxes, np.ones(5, int),
                           np.array([0.9, 0.8, 0.7, 0.6, 0.95]), masks,
                           ["bg", "person"], alpha=1.0)
  assert out.shape == (40, 100, 3) and out.dtype == np.uint8
  colour = viz.palette(256)
  np.testing.assert_array_equal(out[16, 7], RED)
  np.testing.assert_array_equal(out[35, 35], GREEN)
  # Box 0 is clipped to [0, 0, 19, 19]; no room above: its label is inside,
  # from the top-left corner, wider than the box.
  np.testing.assert_array_equal(out[19, 10], RED)
  np.testing.assert_array_equal(out[15, 19], RED)
  np.testing.assert_array_equal(out[0, 30], RED)
  # The huge box outlines the image's border (drawn under the others).
  np.testing.assert_array_equal(out[39, 50], colour[3])
  np.testing.assert_array_equal(out[25, 0], colour[3])
  # Box 4 is clipped to [90, 30, 99, 39]; its label sits above it, shifted
  # left so that it ends at the image's right edge.
  np.testing.assert_array_equal(out[35, 90], colour[5])
  np.testing.assert_array_equal(out[29, 99], colour[5])
  np.testing.assert_array_equal(out[29, 60], colour[5])
  np.testing.assert_array_equal(out[25, 30], image[25, 30])


def test_draw_instances_with_no_detections_copies_the_image():
  image = _scene(seed=3)
  for masks in (np.zeros((0, 80, 120), bool), np.zeros((0,), bool)):
    out = viz.draw_instances(image, np.zeros((0, 4)), np.zeros((0,), int),
                             np.zeros((0,)), masks)
    np.testing.assert_array_equal(out, image)
    assert not np.shares_memory(out, image)
  grey = viz.draw_instances(image[..., 0], np.zeros((0, 4)), [], [], [])
  assert grey.shape == (80, 120, 3) and grey.dtype == np.uint8


def test_draw_instances_rejects_bad_inputs():
  image = np.zeros((10, 12, 3), np.uint8)
  one = (np.array([[0., 0., 5., 5.]]), np.array([1]), np.array([0.9]))
  with pytest.raises(errors.DataError, match="differ in size"):
    viz.draw_instances(image, *one, np.zeros((1, 12, 10), bool))
  with pytest.raises(errors.DataError, match=r"\[D, 4\]"):
    viz.draw_instances(image, np.zeros((1, 3)), *one[1:],
                       np.zeros((1, 10, 12), bool))
  with pytest.raises(errors.DataError, match=r"\[D, H, W\]"):
    viz.draw_instances(image, *one, np.zeros((2, 10, 12), bool))
  with pytest.raises(errors.DataError, match="uint8"):
    viz.draw_instances(image.astype(np.float32), *one,
                       np.zeros((1, 10, 12), bool))
  with pytest.raises(errors.ConfigError):
    viz.draw_instances(image, *one, np.zeros((1, 10, 12), bool), alpha=-0.1)


def test_instance_map_higher_score_wins_overlaps():
  masks = np.zeros((4, 3, 4), bool)
  masks[0, :, :2] = True   # 0.6
  masks[1, :, 1:3] = True  # 0.9, overlaps 0 in column 1.
  masks[2, :, 3] = True    # 0.4: under the threshold.
  masks[3, 0, :] = True    # 0.9 too: ties with 1, loses (higher index).
  ids = viz.instance_map(masks, np.array([0.6, 0.9, 0.4, 0.9]), 0.5)
  assert ids.dtype == np.int32 and ids.shape == (3, 4)
  np.testing.assert_array_equal(ids, [[4, 2, 2, 4],
                                      [1, 2, 2, 0],
                                      [1, 2, 2, 0]])
  # Class 0 is padding; soft masks are thresholded at 0.5.
  soft = masks.astype(np.float32) * 0.7
  ids = viz.instance_map(soft, np.array([0.6, 0.9, 0.4, 0.9]), 0.5,
                         classes=np.array([1, 0, 1, 1]))
  np.testing.assert_array_equal(ids, [[4, 4, 4, 4],
                                      [1, 1, 0, 0],
                                      [1, 1, 0, 0]])
