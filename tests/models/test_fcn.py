"""FCN-32s/16s/8s: the Caffe crops and the 'same' alignment, shapes, learning.

The alignment tests make every layer pass one channel through unchanged
(centre tap 1, all else 0), so an impulse in the image reaches the scores
as a 1 in the cell of the finest fused map that contains it, and the
bilinear upsampling turns that into a tent. The logits must then equal the
tent centred where that cell's centre lies *in the image*: that checks the
crop offsets (Caffe) and the padding of the transposed convs ("same").
The learning test is in test_vgg_seed_learning.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import models
from segjax.models import fcn

WIDTHS = (4, 4, 4, 4, 4)


def make_key(seed):
  return jax.random.key(seed, impl="rbg")


def init(model, shape):
  return jax.jit(lambda x: model.init(make_key(0), x, train=False))(
      jnp.zeros(shape, jnp.float32))


def passthrough_params(params, score_layer):
  """Params making channel 0 flow from the image into class 0 unchanged."""
  def leaf(path, value):
    names = [getattr(p, "key", None) for p in path]
    if names[-1] == "bias":
      return jnp.zeros_like(value)
    if names[-2].startswith("upscore"):
      return value  # the bilinear initialisation
    out = np.zeros(value.shape, np.float32)
    if names[-2].startswith("score_") and names[-2] != score_layer:
      return jnp.asarray(out)
    kh, kw = value.shape[:2]
    out[kh // 2, kw // 2, 0, 0] = 1.0
    return jnp.asarray(out)
  return jax.tree_util.tree_map_with_path(leaf, params)


def tent(size, centre, stride):
  """Bilinear upsampling of a single 1 at `centre` (image coordinates)."""
  d = np.abs(np.arange(size) - centre)
  return np.maximum(0.0, 1.0 - d / stride)


# Every Caffe crop; "same" 8s runs both padded 2x upsamplings and the final.
@pytest.mark.parametrize("variant,score_layer,stride,alignment", [
    ("32s", "score_fr", 32, "caffe"), ("16s", "score_pool4", 16, "caffe"),
    ("8s", "score_pool3", 8, "caffe"), ("8s", "score_pool3", 8, "same")])
def test_impulse_lands_on_its_cell_centre(variant, score_layer, stride,
                                          alignment):
  h, w = 70, 45
  model = fcn.FCN(1, variant=variant, alignment=alignment, widths=(1,) * 5,
                  fc_width=1, zero_init_scores=False)
  variables = init(model, (1, h, w, 3))
  params = passthrough_params(variables["params"], score_layer)
  # Caffe's conv1_1 pads by 100: image pixel p is padded-map pixel p + 99
  # (the 3x3 conv's centre), so cells start at 99 pixels before the image.
  shift = 99 if alignment == "caffe" else 0
  impulses = [(0, 0), (37, 20), (h - 1, w - 1)]
  images = np.zeros((len(impulses), h, w, 3), np.float32)
  for i, (py, px) in enumerate(impulses):
    images[i, py, px, 0] = 1.0
  logits = jax.jit(lambda p, x: model.apply({"params": p}, x)["logits"])(
      params, images)
  centre = lambda p: stride * ((p + shift) // stride) - shift + (stride - 1) / 2
  for i, (py, px) in enumerate(impulses):
    expected = np.outer(tent(h, centre(py), stride),
                        tent(w, centre(px), stride))
    np.testing.assert_allclose(logits[i, :, :, 0], expected, atol=1e-5,
                               err_msg=f"impulse at {(py, px)}")


def test_caffe_crop_offsets_are_the_reference_nets():
  assert fcn.CAFFE_CROPS == {"score_pool4": 5, "score_pool3": 9,
                             "32s": 19, "16s": 27, "8s": 31}


@pytest.mark.parametrize("alignment", ["caffe", "same"])
def test_fcn8s_any_size(alignment):
  model = models.build("fcn8s", 3, alignment=alignment, widths=WIDTHS,
                       fc_width=8)
  for size in [(65, 77), (1, 1), (33, 17)]:
    shapes = jax.eval_shape(
        lambda x: model.init_with_output(make_key(0), x)[0],
        jnp.zeros((2, *size, 3)))
    assert shapes["logits"].shape == (2, *size, 3)
    assert shapes["logits"].dtype == jnp.float32


def test_final_upsampling_fixed_unless_asked():
  model = models.build("fcn32s", 3, alignment="same", widths=(1,) * 5,
                       fc_width=1)
  params = init(model, (1, 1, 1, 3))["params"]
  assert "upscore32" not in params
  assert not np.any(params["score_fr"]["kernel"])  # zero-initialised
  learned = models.build("fcn8s", 3, widths=WIDTHS, fc_width=8,
                         learn_final_upsampling=True)
  params = jax.eval_shape(lambda: learned.init(
      make_key(0), jnp.zeros((1, 32, 32, 3))))["params"]
  assert params["upscore8"]["kernel"].shape == (16, 16, 3, 3)
  assert params["upscore2"]["kernel"].shape == (4, 4, 3, 3)
  assert params["upscore_pool4"]["kernel"].shape == (4, 4, 3, 3)
  fixed = models.build("fcn8s", 3, widths=WIDTHS, fc_width=8,
                       learn_2x_upsampling=False)
  params = jax.eval_shape(lambda: fixed.init(
      make_key(0), jnp.zeros((1, 32, 32, 3))))["params"]
  assert not any(name.startswith("upscore") for name in params)
