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
