"""SegNet and DeconvNet: pooling-index unpooling, the mirrored decoder, sizes.

The learning tests are in test_vgg_seed_learning.py.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import models
from segjax.errors import ConfigError
from segjax.models import segnet
from segjax.models.backbones.vgg import WIDTHS

TINY = dict(widths=(4,) * 5, stage_sizes=(1,) * 5)


def make_key(seed):
  return jax.random.key(seed, impl="rbg")


def run_recording(model, images, names):
  """Applies a freshly initialised model (eval mode) under jit; returns
  {name: (input, output)} of the submodules called `names`."""
  variables = jax.jit(lambda x: model.init(make_key(0), x))(images)

  @jax.jit
  def run(variables, images):
    record = {}

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name == "__call__" and context.module.name in names:
        record[context.module.name] = (args[0], out)
      return out

    with nn.intercept_methods(interceptor):
      model.apply(variables, images)
    return record

  return run(variables, images)


@pytest.mark.parametrize("name,first_conv,last_conv_before", [
    ("segnet", "conv1_2_D", "conv2_1_D"),
    ("deconvnet", "deconv1_1", "deconv2_2"),
])
def test_unpooling_puts_values_at_the_encoders_argmax(name, first_conv,
                                                      last_conv_before):
  # Two convs per stage 1 and 2 so that stage 1 of the decoder has a conv
  # whose input is the unpooled map.
  model = models.build(name, 3, widths=(4,) * 5, stage_sizes=(2, 2, 1, 1, 1),
                       **({"fc_width": 8} if name == "deconvnet" else {}))
  # DeconvNet pads to 224 anyway; SegNet needs only a multiple of 32.
  size = 224 if name == "deconvnet" else 64
  images = jax.random.normal(make_key(1), (1, size, size, 3))
  rec = run_recording(model, images, {"encoder", first_conv,
                                      last_conv_before})
  _, encoder = rec["encoder"]
  unpooled = np.asarray(rec[first_conv][0])        # [1, size, size, C]
  decoded = np.asarray(rec[last_conv_before][1])   # [1, size/2, size/2, C]
  conv1 = np.asarray(encoder["conv1"])             # the map pool1 pooled
  indices = np.asarray(encoder["indices1"])
  n, h, w, c = conv1.shape
  assert unpooled.shape == conv1.shape
  # Every 2x2 window holds the decoded value at the encoder's maximum and
  # zeros elsewhere.
  windows = conv1.reshape(n, h // 2, 2, w // 2, 2, c)
  flat = np.zeros_like(unpooled).reshape(n, h * w, c)
  ys, xs = np.meshgrid(np.arange(h // 2), np.arange(w // 2), indexing="ij")
  for ch in range(c):
    at = indices[0, :, :, ch]
    flat[0, at.ravel(), ch] = decoded[0, :, :, ch].ravel()
    # The index is the window's argmax of the encoder's map.
    window_max = windows[0, :, :, :, :, ch].max(axis=(1, 3))
    np.testing.assert_array_equal(
        conv1[0, :, :, ch].ravel()[at.ravel()], window_max.ravel())
    rows, cols = at // w, at % w
    assert np.all(rows // 2 == ys) and np.all(cols // 2 == xs)
  np.testing.assert_array_equal(unpooled, flat.reshape(unpooled.shape))


def test_decoder_widths_mirror_the_encoder():
  stages = segnet.VGG16_STAGES
  assert segnet.decoder_widths(WIDTHS, stages, 1) == {
      5: (512, 512, 512), 4: (512, 512, 256), 3: (256, 256, 128),
      2: (128, 64), 1: (64,)}
  assert segnet.decoder_widths(WIDTHS, stages, 2)[1] == (64, 64)


@pytest.mark.parametrize("name", ["segnet", "deconvnet"])
def test_paper_layers(name):
  model = models.build(name, 21)
  params = jax.eval_shape(lambda: model.init(
      make_key(0), jnp.zeros((1, 224, 224, 3))))["params"]
  if name == "segnet":
    assert "fc6" not in params
    assert params["decoder"]["conv5_3_D"]["conv"]["kernel"].shape == (
        3, 3, 512, 512)
    assert params["decoder"]["conv3_1_D"]["conv"]["kernel"].shape == (
        3, 3, 256, 128)
    assert params["decoder"]["conv1_2_D"]["conv"]["kernel"].shape == (
        3, 3, 64, 64)
    assert params["conv1_1_D"]["kernel"].shape == (3, 3, 64, 21)
    assert len(params["decoder"]) == 12  # 13 encoder convs, the 13th is K
  else:
    assert params["fc6"]["conv"]["kernel"].shape == (7, 7, 512, 4096)
    assert params["fc7"]["conv"]["kernel"].shape == (1, 1, 4096, 4096)
    assert params["deconv_fc6"]["kernel"].shape == (7, 7, 4096, 512)
    assert params["decoder"]["deconv4_3"]["conv"]["kernel"].shape == (
        3, 3, 512, 256)
    assert params["decoder"]["deconv1_2"]["conv"]["kernel"].shape == (
        3, 3, 64, 64)
    assert params["seg_score"]["kernel"].shape == (1, 1, 64, 21)
    assert len(params["decoder"]) == 13
  assert params["encoder"]["bn5_3"]["scale"].shape == (512,)


@pytest.mark.parametrize("name", ["segnet", "deconvnet"])
@pytest.mark.parametrize("size", [(65, 77), (1, 1), (250, 300)])
def test_any_input_size(name, size):
  model = models.build(name, 3, **TINY,
                       **({"fc_width": 8} if name == "deconvnet" else {}))
  out = jax.eval_shape(lambda x: model.init_with_output(make_key(0), x)[0],
                       jnp.zeros((2, *size, 3)))
  assert out["logits"].shape == (2, *size, 3)
  assert out["logits"].dtype == jnp.float32


def test_deconvnet_fc6_is_a_valid_7x7_on_padded_input():
  model = models.build("deconvnet", 3, **TINY, fc_width=8)
  shapes = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and context.module.name in (
        "fc6", "deconv_fc6"):
      shapes[context.module.name] = out.shape
    return out

  for size, fc6, pool5 in [((64, 64), (1, 1), (7, 7)),
                           ((250, 300), (2, 4), (8, 10))]:
    with nn.intercept_methods(interceptor):
      jax.eval_shape(lambda x: model.init_with_output(make_key(0), x)[0],
                     jnp.zeros((1, *size, 3)))
    # 64 -> padded to 224 (pool5 7x7); 250x300 -> 256x320 (pool5 8x10).
    assert shapes["fc6"][1:3] == fc6
    assert shapes["deconv_fc6"][1:3] == pool5
  with pytest.raises(ConfigError, match="min_size"):
    models.build("deconvnet", 3, min_size=192)
