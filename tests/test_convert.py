"""segjax.convert: strictness, and parity with torchvision on random weights.

The parity tests convert randomly initialised torchvision models (BatchNorm
statistics randomised too, so a swapped mean/var would show) and compare the
outputs of both in eval mode on the same random input. They skip cleanly
where torch or torchvision is not installed.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import convert
from segjax import models
from segjax.errors import CheckpointError, ConfigError
from segjax.models.backbones import resnet as resnet_lib
from segjax.models.backbones import vgg as vgg_lib

RTOL = 1e-4


def relative_error(ours, theirs):
  """max |ours - theirs| / max |theirs|: one number per output."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


# --- strictness (no torch needed) -------------------------------------------


def _numpy_state(variables, rows):
  """A torch-layout state dict made from segjax variables by `rows`."""
  state = {}
  for torch_module, flax_path, kind in rows:
    for collection, leaf, suffix, _, _ in convert.KINDS[kind]:
      tree = variables[collection]
      for name in flax_path:
        tree = tree[name]
      if leaf not in tree:
        continue
      value = np.asarray(tree[leaf])
      if kind == "conv" and leaf == "kernel":
        value = value.transpose(3, 2, 0, 1)
      state[f"{torch_module}.{suffix}"] = value
  return state


def _random_state(name, **kwargs):
  """(variables, torch-layout state dict) for converter `name`, random values.

  Shapes come from eval_shape: nothing is computed, so even ResNet-101 is
  cheap.
  """
  conversion = convert.CONVERTERS[name]({}, **kwargs)
  model = conversion.model
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map(
      lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  return variables, _numpy_state(variables, conversion.rows)


@pytest.fixture(scope="module")
def vgg_bn_state():
  return _random_state("vgg16_bn")


@pytest.mark.parametrize("name", convert.available())
def test_round_trip_every_converter(name):
  kwargs = {}
  if name in models.MODELS:
    kwargs = dict(num_classes=3, aux=True)
  variables, state = _random_state(name, **kwargs)
  # BatchNorm counters are skipped, not reported as unexpected.
  state["bn1.num_batches_tracked"] = np.array(7)
  converted = convert.from_torch(name, state, **kwargs)
  expected = jax.tree_util.tree_leaves_with_path(variables)
  got = dict(jax.tree_util.tree_leaves_with_path(converted))
  assert len(expected) == len(got)
  for path, leaf in expected:
    assert got[path].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got[path]), leaf)


def test_backbones_accept_whole_classifier_state_dicts():
  variables, state = _random_state("vgg16")
  whole = {f"features.{k}": v for k, v in state.items()}
  whole["classifier.0.weight"] = np.zeros((4096, 25088), np.float32)
  converted = convert.from_torch("vgg16", whole)
  np.testing.assert_array_equal(converted["params"]["conv5_3"]["bias"],
                                variables["params"]["conv5_3"]["bias"])
  _, state = _random_state("resnet50")
  state["fc.weight"] = np.zeros((1000, 2048), np.float32)
  state["fc.bias"] = np.zeros((1000,), np.float32)
  assert "fc" not in convert.from_torch("resnet50", state)["params"]


def test_rejects_missing_unexpected_and_misshaped_keys(vgg_bn_state):
  _, state = vgg_bn_state
  state = dict(state)
  del state["1.running_var"]
  state["99.weight"] = np.zeros(3, np.float32)
  state["40.weight"] = np.zeros((512, 512, 1, 1), np.float32)
  with pytest.raises(CheckpointError) as err:
    convert.from_torch("vgg16_bn", state)
  message = str(err.value)
  assert "missing keys (1): 1.running_var" in message
  assert "unexpected keys (1): 99.weight" in message
  assert re.search(r"40\.weight: shape \(512, 512, 1, 1\), expected "
                   r"\(512, 512, 3, 3\)", message)


def test_wrong_num_classes_says_how_to_fix():
  model = models.build("fcn_resnet50", 4, stage_sizes=(1, 1, 1, 1), width=8)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  variables = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32),
                                     variables)
  kwargs = dict(stage_sizes=(1, 1, 1, 1), width=8)
  rows = convert.CONVERTERS["fcn_resnet50"]({}, num_classes=4, aux=False,
                                            **kwargs).rows
  state = _numpy_state(variables, rows)
  with pytest.raises(CheckpointError, match="pass num_classes=4"):
    convert.from_torch("fcn_resnet50", state, num_classes=21, **kwargs)
  # By default the number of classes is read from the checkpoint.
  converted = convert.from_torch("fcn_resnet50", state, **kwargs)
  assert converted["params"]["classifier"]["head"]["kernel"].shape[-1] == 4


def test_unknown_name_lists_converters():
  with pytest.raises(ConfigError, match="deeplab_v3_resnet50"):
    convert.from_torch("no_such_model", {})


# --- parity with torchvision ------------------------------------------------


@pytest.fixture(scope="module")
def torch():
  torch = pytest.importorskip("torch")
  pytest.importorskip("torchvision")
  torch.manual_seed(0)
  torch.set_num_threads(1)
  return torch


def _randomise_bn(torch, module):
  """Random BN statistics and affine params (init has mean 0, var 1, 1, 0)."""
  generator = torch.Generator().manual_seed(1)
  for m in module.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      c = m.num_features
      m.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
      m.running_var.copy_(0.5 + torch.rand(c, generator=generator))
      m.weight.data.copy_(0.5 + torch.rand(c, generator=generator))
      m.bias.data.copy_(0.1 * torch.randn(c, generator=generator))
  return module.eval()


def _input(torch, h, w):
  x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(2))
  return x, jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _apply(model, variables, images):
  with jax.default_matmul_precision("highest"):
    return jax.jit(lambda v, x: model.apply(v, x, train=False))(
        variables, images)


@pytest.mark.parametrize("name,builder", [
    ("fcn_resnet50", "fcn_resnet50"),
    ("deeplab_v3_resnet50", "deeplabv3_resnet50"),
])
def test_segmentation_parity(torch, name, builder):
  from torchvision.models import segmentation
  net = getattr(segmentation, builder)(weights=None, weights_backbone=None,
                                       num_classes=5, aux_loss=True)
  net = _randomise_bn(torch, net)
  x, images = _input(torch, 65, 77)
  with torch.no_grad():
    expected = net(x)
  variables = convert.from_torch(name, net.state_dict(), num_classes=5)
  model = models.build(name, 5, aux=True)
  outputs = _apply(model, variables, images)
  err = relative_error(outputs["logits"], _nhwc(expected["out"]))
  aux_err = relative_error(outputs["aux"][0], _nhwc(expected["aux"]))
  print(f"{name}: logits rel err {err:.2e}, aux {aux_err:.2e}")
  assert err < RTOL and aux_err < RTOL


def test_resnet50_parity(torch):
  import torchvision
  net = _randomise_bn(torch, torchvision.models.resnet50())
  x, images = _input(torch, 65, 77)
  with torch.no_grad():
    stem = net.relu(net.bn1(net.conv1(x)))
    expected = {"stem": stem}
    y = net.maxpool(stem)
    for s in range(1, 5):
      y = getattr(net, f"layer{s}")(y)
      expected[f"c{s + 1}"] = y
  variables = convert.from_torch("resnet50", net.state_dict())
  outputs = _apply(resnet_lib.ResNet50(), variables, images)
  for key, value in expected.items():
    err = relative_error(outputs[key], _nhwc(value))
    print(f"resnet50 {key}: rel err {err:.2e}")
    assert err < RTOL, key


@pytest.mark.parametrize("batch_norm", [False, True])
def test_vgg16_parity(torch, batch_norm):
  import torchvision
  net = (torchvision.models.vgg16_bn if batch_norm else
         torchvision.models.vgg16)()
  features = _randomise_bn(torch, net.features)
  x, images = _input(torch, 67, 70)
  expected, y = [], x
  with torch.no_grad():
    for layer in features:
      y = layer(y)
      if isinstance(layer, torch.nn.MaxPool2d):
        expected.append(y)
  variables = convert.from_torch("vgg16_bn" if batch_norm else "vgg16",
                                 features.state_dict())
  outputs = _apply(vgg_lib.VGG(batch_norm=batch_norm), variables, images)
  for i, value in enumerate(expected, 1):
    err = relative_error(outputs[f"pool{i}"], _nhwc(value))
    print(f"vgg16{'_bn' * batch_norm} pool{i}: rel err {err:.2e}")
    assert err < RTOL


def test_vgg16_ceil_mode_and_first_padding_parity(torch):
  import torchvision
  features = torchvision.models.vgg16().features.eval()
  # FCN's Caffe set-up: a padded first conv and ceil-mode pooling.
  features[0].padding = (5, 5)
  for layer in features:
    if isinstance(layer, torch.nn.MaxPool2d):
      layer.ceil_mode = True
  x, images = _input(torch, 37, 42)
  with torch.no_grad():
    expected = features(x)
  variables = convert.from_torch("vgg16", features.state_dict())
  model = vgg_lib.VGG(ceil_mode=True, first_padding=5)
  outputs = _apply(model, variables, images)
  err = relative_error(outputs["pool5"], _nhwc(expected))
  print(f"vgg16 ceil_mode pool5: rel err {err:.2e}")
  assert err < RTOL
