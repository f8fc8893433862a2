"""Inference modes: whole image, sliding window, multi-scale + flip, buckets."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import models
from segjax.errors import ConfigError
from segjax.inference import InferenceOptions, Segmenter
from segjax.ops import region_resize, resize


class Pointwise(nn.Module):
  """A per-pixel classifier: its logits at a pixel ignore every other pixel."""
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train=False):
    return {"logits": nn.Dense(self.num_classes)(x)}


def setup_model(model, size=(32, 32)):
  images = jnp.zeros((1, *size, 3))
  return model, model.init(jax.random.key(0), images, train=False)


def image(h, w, seed=0):
  return np.random.default_rng(seed).normal(size=(h, w, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def unet():
  return setup_model(models.build("unet", num_classes=3, base_width=4, depth=2))


@pytest.mark.parametrize("in_hw,out_hw", [((20, 30), (45, 17)), ((33, 8), (11, 64))])
def test_region_resize_equals_resize_when_regions_fill_canvases(in_hw, out_hw):
  x = np.random.default_rng(0).normal(size=(2, *in_hw, 3)).astype(np.float32)
  got = region_resize.resize_region(jnp.asarray(x), out_hw, jnp.array(in_hw),
                                    jnp.array(out_hw))
  np.testing.assert_allclose(got, resize(jnp.asarray(x), out_hw), atol=1e-5)


def test_region_resize_reads_and_writes_only_the_regions():
  x = np.random.default_rng(1).normal(size=(1, 40, 40, 2)).astype(np.float32)
  got = region_resize.resize_region(jnp.asarray(x), (50, 60), jnp.array([25, 31]),
                                    jnp.array([37, 44]))
  want = resize(jnp.asarray(x[:, :25, :31]), (37, 44))
  np.testing.assert_allclose(got[:, :37, :44], want, atol=1e-5)
  assert not np.asarray(got[:, 37:]).any() and not np.asarray(got[:, :, 44:]).any()


def test_flip_region_mirrors_only_the_region():
  x = jnp.arange(6.0).reshape(1, 1, 6, 1)
  np.testing.assert_array_equal(region_resize.flip_region(x, 4)[0, 0, :, 0],
                                [3, 2, 1, 0, 4, 5])


@pytest.mark.parametrize("stride", [(32, 32), (16, 16), (20, 24)])
def test_slide_equals_whole_for_a_pointwise_model(stride):
  model, variables = setup_model(Pointwise())
  x = image(64, 96)
  whole, whole_probs = Segmenter(model, InferenceOptions(bucket=1))(variables, x)
  slide = Segmenter(model, InferenceOptions(mode="slide", crop_size=(32, 32), stride=stride))
  labels, probs = slide(variables, x)
  np.testing.assert_allclose(probs, whole_probs, atol=1e-6)
  np.testing.assert_array_equal(labels, whole)


def test_slide_with_one_window_per_image_equals_whole(unet):
  model, variables = unet
  x = image(48, 40)
  _, whole = Segmenter(model, InferenceOptions(bucket=1))(variables, x)
  _, slide = Segmenter(model, InferenceOptions(mode="slide", crop_size=(48, 40),
                                               stride=(16, 16), bucket=1))(variables, x)
  np.testing.assert_allclose(slide, whole, atol=1e-5)


def test_slide_counts_overlaps_like_mmsegmentation():
  """Windows of 32 every 24 over 70 px start at 0, 24 and 38 (the last one
  shifted to end at the border): the model's output is averaged over 1-2
  windows per pixel, so a pointwise model still gives the whole-image answer
  while an image smaller than a crop gets one zero-padded window."""
  model, variables = setup_model(Pointwise())
  x = image(70, 20)
  _, whole = Segmenter(model, InferenceOptions(bucket=1))(variables, x)
  _, slide = Segmenter(model, InferenceOptions(mode="slide", crop_size=(32, 32),
                                               stride=(24, 24), bucket=64))(variables, x)
  np.testing.assert_allclose(slide, whole, atol=1e-6)


class WindowAware(nn.Module):
  """Logits that depend on the whole input and on where a pixel lies in it:
  a 3x3 conv with zero padding (a window's border pixels see zeros), ramps
  over the input's rows and columns relative to its size, and a term of
  the input's mean (as the image pooling of PSPNet or ASPP). Every window
  placement and size, and zero padding, gives its pixels other logits,
  unlike a pointwise model."""
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train=False):
    h, w = x.shape[1:3]
    rows = jnp.broadcast_to(jnp.arange(h, dtype=jnp.float32)[:, None] / h, (h, w))
    cols = jnp.broadcast_to(jnp.arange(w, dtype=jnp.float32)[None, :] / w, (h, w))
    ramps = 4 * jnp.stack([rows, cols, -(rows + cols) / 2], axis=-1)
    pooled = nn.Dense(self.num_classes)(x.mean(axis=(1, 2), keepdims=True))
    conv = nn.Conv(self.num_classes, (3, 3), padding="SAME")(x)
    return {"logits": conv + ramps + pooled}


def mmseg_slide_probs(apply, x, crop, stride):
  """mmsegmentation's EncoderDecoder.slide_inference, written out with numpy:
  windows at multiples of the stride, the last one of a row or column moved
  back to end at the border, each clipped to the image (a side shorter than
  the crop is run unpadded), every window run on its own, the logits summed
  and divided by the per-pixel window count; then the softmax."""
  height, width = x.shape[:2]
  (ch, cw), (sh, sw) = crop, stride
  h_grids = max(height - ch + sh - 1, 0) // sh + 1
  w_grids = max(width - cw + sw - 1, 0) // sw + 1
  preds = np.zeros((height, width, 3))
  count = np.zeros((height, width, 1))
  for i in range(h_grids):
    for j in range(w_grids):
      y1, x1 = i * sh, j * sw
      y2, x2 = min(y1 + ch, height), min(x1 + cw, width)
      y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
      preds[y1:y2, x1:x2] += np.asarray(apply(x[None, y1:y2, x1:x2]))[0]
      count[y1:y2, x1:x2] += 1
  assert (count > 0).all()
  return np.asarray(jax.nn.softmax(preds / count, axis=-1))


@pytest.mark.parametrize("hw,crop,stride,bucket", [
    # Rows at 0, 24 and 38 (shifted back from 48); columns 0 and 20 fit.
    ((70, 52), (32, 32), (24, 20), 32),
    ((70, 52), (32, 32), (24, 20), 1),
    # Tiles without overlap.
    ((64, 96), (32, 32), (32, 32), 32),
    # Up to four windows a pixel; the last row and column both shifted.
    ((45, 61), (32, 24), (10, 16), 32),
    # Shorter than the crop: windows 20 rows high (exact with bucket 1) ...
    ((20, 70), (32, 32), (24, 24), 1),
    # ... or one window, the whole image.
    ((20, 28), (32, 32), (24, 24), 1),
])
def test_slide_places_windows_like_mmsegmentation(hw, crop, stride, bucket):
  """Slide mode equals mmsegmentation's slide_inference run window by window
  for a model whose logits depend on its whole window and the position in
  it, so a wrong stride, a last window not moved back to the border, a
  window not clipped to a short image (run zero-padded to the crop
  instead), or averaging probabilities instead of logits changes the
  result. With bucket 32 the image sits on a larger canvas whose padding no
  window may read."""
  model, variables = setup_model(WindowAware())
  apply = jax.jit(lambda x: model.apply(variables, x)["logits"])
  x = image(*hw, seed=11)
  segmenter = Segmenter(model, InferenceOptions(mode="slide", crop_size=crop,
                                                stride=stride, bucket=bucket))
  labels, probs = segmenter(variables, x)
  want = mmseg_slide_probs(apply, x, crop, stride)
  np.testing.assert_allclose(probs, want, atol=1e-5)
  np.testing.assert_array_equal(labels, want.argmax(-1))


def test_flip_tta_is_invariant_under_flipping_the_input(unet):
  model, variables = unet
  x = image(40, 56, seed=3)
  segmenter = Segmenter(model, InferenceOptions(scales=(0.75, 1.0), flip=True))
  _, probs = segmenter(variables, x)
  _, flipped = segmenter(variables, x[:, ::-1].copy())
  np.testing.assert_allclose(flipped[:, ::-1], probs, atol=1e-6)


def test_multiscale_on_three_sizes_compiles_once_per_canvas(unet):
  model, variables = unet
  segmenter = Segmenter(model, InferenceOptions(scales=(0.5, 1.0, 1.5), flip=True,
                                                resize_to=(32, 32), bucket=64))
  for h, w in [(50, 60), (64, 41), (37, 64)]:
    labels, probs = segmenter(variables, image(h, w))
    assert labels.shape == (h, w) and probs.shape == (h, w, 3)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  assert segmenter.compilations == 1
  segmenter(variables, image(70, 30))  # a 128 x 64 canvas
  assert segmenter.compilations == 2


def test_resize_to_is_unchanged_by_the_canvas_padding(unet):
  model, variables = unet
  x = image(45, 29, seed=5)
  options = dict(resize_to=(32, 32), scales=(0.5, 1.25))
  _, exact = Segmenter(model, InferenceOptions(bucket=1, **options))(variables, x)
  _, padded = Segmenter(model, InferenceOptions(bucket=64, **options))(variables, x)
  np.testing.assert_allclose(padded, exact, atol=1e-5)


def test_resize_to_equals_resizing_by_hand(unet):
  model, variables = unet
  x = image(45, 29, seed=6)
  _, probs = Segmenter(model, InferenceOptions(resize_to=(32, 32)))(variables, x)
  logits = model.apply(variables, resize(jnp.asarray(x[None]), (32, 32)),
                       train=False)["logits"]
  want = jax.nn.softmax(resize(logits, (45, 29)), axis=-1)[0]
  np.testing.assert_allclose(probs, want, atol=1e-5)


def test_confusion_at_the_original_resolution(unet):
  model, variables = unet
  segmenter = Segmenter(model, InferenceOptions(bucket=64, resize_to=(32, 32)))
  x = image(50, 37, seed=7)
  label = np.random.default_rng(0).integers(0, 3, (50, 37))
  label[:5] = 255
  predicted, _ = segmenter(variables, x)
  want = np.zeros((3, 3), np.int64)
  keep = label != 255
  np.add.at(want, (label[keep], predicted[keep]), 1)
  np.testing.assert_array_equal(segmenter.confusion(variables, x, label, 3), want)


def test_bad_options_are_config_errors():
  with pytest.raises(ConfigError, match="crop_size"):
    InferenceOptions(mode="slide")
  with pytest.raises(ConfigError, match="whole"):
    InferenceOptions(mode="tiles")
  with pytest.raises(ConfigError, match="scales"):
    InferenceOptions(scales=())
