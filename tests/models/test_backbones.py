"""Backbones: feature shapes, strides and channels; dilation; frozen BN."""
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.errors import ConfigError
from segjax.models.backbones import resnet as resnet_lib
from segjax.models.backbones import vgg as vgg_lib

# Small enough for CPU; two blocks in layer3 and layer4 show the first-block
# rule of dilated stages.
TINY = dict(stage_sizes=(1, 1, 2, 2), width=4)
SMALLEST = dict(stage_sizes=(1, 1, 1, 1), width=4)


def make_key(seed):
  return jax.random.key(seed, impl="rbg")


def init_apply(model, images):
  """(variables, eval-mode outputs), in one compilation."""
  outputs, variables = jax.jit(lambda x: model.init_with_output(
      make_key(0), x, train=False))(images)
  return variables, outputs


def torch_out_size(size, stride):
  """Size after PyTorch's stride-2 layers (pad k//2): ceil per layer."""
  for _ in range(int(math.log2(stride))):
    size = (size - 1) // 2 + 1
  return size


@pytest.mark.parametrize("output_stride", [32, 16, 8])
def test_resnet_shapes_strides_channels(output_stride):
  model = resnet_lib.ResNet(output_stride=output_stride, **TINY)
  assert model.strides == {"stem": 2, "c2": 4, "c3": 8,
                           "c4": min(16, output_stride), "c5": output_stride}
  assert model.channels == {"stem": 4, "c2": 16, "c3": 32, "c4": 64,
                            "c5": 128}
  images = jnp.zeros((2, 65, 77, 3))
  _, features = init_apply(model, images)
  assert set(features) == set(resnet_lib.FEATURES)
  for name, x in features.items():
    stride = model.strides[name]
    assert x.shape == (2, torch_out_size(65, stride),
                       torch_out_size(77, stride), model.channels[name]), name


def test_resnet50_channels():
  assert resnet_lib.ResNet50().channels == {
      "stem": 64, "c2": 256, "c3": 512, "c4": 1024, "c5": 2048}


def test_block_schedule_matches_torchvision_rule():
  # torchvision, replace_stride_with_dilation=[False, True, True]: a dilated
  # stage's first block keeps the previous stage's rate.
  assert resnet_lib.block_schedule((3, 4, 6, 3), 8) == (
      ((1, 1),) * 3,
      ((2, 1),) + ((1, 1),) * 3,
      ((1, 1),) + ((1, 2),) * 5,
      ((1, 2), (1, 4), (1, 4)))
  assert resnet_lib.block_schedule((3, 4, 6, 3), 16)[2:] == (
      ((2, 1),) + ((1, 1),) * 5,
      ((1, 1), (1, 2), (1, 2)))
  assert resnet_lib.block_schedule((3, 4, 6, 3), 32)[3] == (
      (2, 1), (1, 1), (1, 1))


@pytest.mark.parametrize("output_stride,rates", [
    (32, (1, 2, 4)), (16, (2, 4, 8)), (8, (4, 8, 16))])
def test_multi_grid(output_stride, rates):
  schedule = resnet_lib.block_schedule((3, 4, 6, 3), output_stride, (1, 2, 4))
  assert tuple(d for _, d in schedule[3]) == rates
  # The earlier stages are untouched.
  assert schedule[:3] == resnet_lib.block_schedule(
      (3, 4, 6, 3), output_stride)[:3]


def test_invalid_options_raise_config_error():
  with pytest.raises(ConfigError, match="output_stride"):
    resnet_lib.ResNet(output_stride=4)
  with pytest.raises(ConfigError, match="multi_grid"):
    resnet_lib.ResNet(multi_grid=(1, 2))
  with pytest.raises(ConfigError, match="stage_sizes"):
    vgg_lib.VGG(stage_sizes=(2, 2, 3))


def _conv2_settings(model, images):
  """{block name: (strides, kernel_dilation)} of every Bottleneck's 3x3 conv,
  read from the nn.Conv modules the model actually calls."""
  seen = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    if (isinstance(module, nn.Conv) and context.method_name == "__call__"
        and module.name == "conv2"):
      seen[module.parent.name] = (tuple(module.strides),
                                  tuple(module.kernel_dilation))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(make_key(0), images, train=False))
  return seen


@pytest.mark.parametrize("output_stride,multi_grid", [(8, None), (16, (1, 3))])
def test_resnet_convs_follow_schedule(output_stride, multi_grid):
  model = resnet_lib.ResNet(output_stride=output_stride,
                            multi_grid=multi_grid, **TINY)
  seen = _conv2_settings(model, jnp.zeros((1, 32, 32, 3)))
  schedule = resnet_lib.block_schedule(TINY["stage_sizes"], output_stride,
                                       multi_grid)
  expected = {f"layer{s + 1}_{b}": ((stride, stride), (rate, rate))
              for s, blocks in enumerate(schedule)
              for b, (stride, rate) in enumerate(blocks)}
  assert seen == expected


def test_frozen_bn_never_updates_batch_stats():
  model = resnet_lib.ResNet(frozen_bn=True, **SMALLEST)
  images = jax.random.normal(make_key(1), (2, 32, 32, 3))
  variables, eval_out = init_apply(model, images)
  # Non-trivial statistics, so "uses the running ones" is observable.
  stats = jax.tree_util.tree_map(lambda v: v + 0.5, variables["batch_stats"])
  variables = {"params": variables["params"], "batch_stats": stats}
  train = jax.jit(lambda m, v: m.apply(v, images, train=True,
                                       mutable=["batch_stats"]),
                  static_argnums=0)
  train_out, updates = train(model, variables)
  eval_out = jax.jit(lambda v: model.apply(v, images))(variables)
  # Structure and values: statistics that lost a leaf fail too.
  chex.assert_trees_all_equal(updates["batch_stats"], stats)
  for name in train_out:
    np.testing.assert_array_equal(train_out[name], eval_out[name])
  # Without frozen_bn, training does update them.
  _, updates = train(resnet_lib.ResNet(**SMALLEST), variables)
  assert not np.allclose(updates["batch_stats"]["bn1"]["mean"],
                         stats["bn1"]["mean"])


def test_bn_axis_name_averages_statistics_across_devices():
  # Two "devices" of one image each under vmap with the axis name must give
  # the statistics of one batch of two.
  images = jax.random.normal(make_key(1), (2, 32, 32, 3))
  variables, _ = init_apply(resnet_lib.ResNet(**SMALLEST), images)

  def train_stats(model, x):
    return model.apply(variables, x, train=True,
                       mutable=["batch_stats"])[1]["batch_stats"]

  synced = resnet_lib.ResNet(bn_axis_name="devices", **SMALLEST)
  per_device = jax.jit(jax.vmap(lambda x: train_stats(synced, x[None]),
                                axis_name="devices"))(images)
  whole = jax.jit(lambda x: train_stats(resnet_lib.ResNet(**SMALLEST), x))(
      images)
  def both_devices_equal_whole(a, b):
    # Float32 sums in another order; unsynchronised statistics of one image
    # each differ by orders of magnitude more.
    np.testing.assert_allclose(a[0], b, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(a[1], b, rtol=1e-3, atol=1e-4)

  # tree_map refuses trees of another structure, so a lost leaf fails too.
  jax.tree_util.tree_map(both_devices_equal_whole, per_device, whole)


def test_resnet_bfloat16_compute_float32_params():
  model = resnet_lib.ResNet(dtype=jnp.bfloat16, **SMALLEST)
  variables, features = init_apply(model, jnp.zeros((1, 32, 32, 3)))
  assert all(x.dtype == jnp.bfloat16 for x in features.values())
  assert all(v.dtype == jnp.float32
             for v in jax.tree_util.tree_leaves(variables))


@pytest.mark.parametrize("batch_norm", [False, True])
def test_vgg_shapes_strides_channels(batch_norm):
  model = vgg_lib.VGG(batch_norm=batch_norm)
  assert model.channels == {"pool1": 64, "pool2": 128, "pool3": 256,
                            "pool4": 512, "pool5": 512}
  assert model.strides == {f"pool{i}": 2**i for i in range(1, 6)}
  variables, features = init_apply(model, jnp.zeros((1, 64, 96, 3)))
  for name, x in features.items():
    stride = model.strides[name]
    assert x.shape == (1, 64 // stride, 96 // stride, model.channels[name])
  assert ("batch_stats" in variables) == batch_norm
  assert "bn1_1" in variables["params"] if batch_norm else "conv5_3" in (
      variables["params"])


@pytest.mark.parametrize("ceil_mode", [False, True])
def test_vgg_ceil_mode_and_first_padding(ceil_mode):
  # A 35-pixel input padded by 100 (FCN) gives a 233-pixel conv1_1 output.
  model = vgg_lib.VGG(stage_sizes=(1, 1, 1, 1, 1), ceil_mode=ceil_mode,
                      first_padding=100)
  _, features = init_apply(model, jnp.zeros((1, 35, 35, 3)))
  size, sizes = 35 + 2 * 99, []
  for _ in range(5):
    size = -(-size // 2) if ceil_mode else size // 2
    sizes.append(size)
  assert [x.shape[1] for x in features.values()] == sizes
