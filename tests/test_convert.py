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

from conftest import needs
from segjax import convert
from segjax import models
from segjax import weights
from segjax.errors import CheckpointError, ConfigError
from segjax.models import fcn
from segjax.models.backbones import resnet as resnet_lib
from segjax.models.backbones import vgg as vgg_lib

# README "Models" (fcn_resnet50/101, deeplab_v3_resnet50/101: "torchvision
# checkpoints convert (equal to 2e-6 relative)") and "Parity tests"
# (fcn_resnet50, deeplabv3_resnet50, vgg16, vgg16_bn, resnet50 "equal to
# 2e-6 relative"). Measured, under jax.default_matmul_precision("highest")
# as every comparison here runs: at most 2.05e-6 with this module's seed
# (vgg16_fc's fc7; the fcn_resnet50 logits 2.04e-6); with three other seeds
# of the random weights 1.9e-6, 2.0e-6 and 2.9e-6 (fcn_resnet50's logits).
# The bound leaves room for that and for another CPU's rounding, not for a
# wrong layout (which errs by O(1)).
CONVERSION_RTOL = 1e-5


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
      if kind == "linear" and leaf == "kernel":
        value = value.T
      if kind.startswith("fc_as_conv") and leaf == "kernel":
        value = value.transpose(3, 2, 0, 1).reshape(value.shape[3], -1)
      # Raw-tensor kinds (a ViT's cls_token) have no suffix.
      state[f"{torch_module}.{suffix}" if suffix else torch_module] = value
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


# Converter options that keep the round trip small (fc6 is 25088 x 4096).
CONVERTER_KWARGS = {"vgg16_fc": dict(fc_width=16),
                    **{f"vit_{size}_patch16_384": dict(width=32, depth=2,
                                                       num_heads=2)
                       for size in ("base", "large")}}
# SegFormer / MiT: narrow and shallow (B1..B5 differ from B0 in sizes only;
# tracing B5's 52 blocks twice costs seconds); no aux head.
_NARROW = dict(hidden_sizes=(8, 16, 16, 16), num_heads=(1, 2, 2, 2),
               depths=(1, 2, 1, 1))
CONVERTER_KWARGS.update({f"mit_b{i}": _NARROW for i in range(6)})
CONVERTER_KWARGS.update({f"segformer_b{i}": dict(_NARROW, num_classes=3,
                                                 decoder_width=16)
                         for i in range(6)})


@pytest.mark.parametrize("name", convert.available())
def test_round_trip_every_converter(name):
  kwargs = dict(CONVERTER_KWARGS.get(name, {}))
  if name in models.MODELS and name not in CONVERTER_KWARGS:
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
  torch = needs("torch")
  needs("torchvision")
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
  assert err <= CONVERSION_RTOL and aux_err <= CONVERSION_RTOL


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
    assert err <= CONVERSION_RTOL, key


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
    assert err <= CONVERSION_RTOL


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
  assert err <= CONVERSION_RTOL


# --- VGG-based seed models (fcn*, deeplab_v1, parsenet, segnet, deconvnet) --


def test_fc_layers_become_convs():
  """classifier.0's [O, 512*7*7] rows are (C, H, W)-flattened 7x7 kernels."""
  variables, state = _random_state("vgg16_fc", fc_width=16)
  kernel = variables["params"]["fc6"]["kernel"]  # [7, 7, 512, 16]
  weight = state["classifier.0.weight"]
  assert weight.shape == (16, 512 * 49)
  c, y, x, o = 5, 2, 6, 3
  assert weight[o, c * 49 + y * 7 + x] == kernel[y, x, c, o]
  state["classifier.6.weight"] = np.zeros((1000, 16), np.float32)  # dropped
  converted = convert.from_torch("vgg16_fc", state, fc_width=16)
  np.testing.assert_array_equal(converted["params"]["fc7"]["kernel"],
                                variables["params"]["fc7"]["kernel"])


@pytest.mark.parametrize("name", sorted(weights.VGG_BACKBONES))
def test_vgg16_into_fills_the_backbone_only(name):
  converter, path = weights.VGG_BACKBONES[name]
  kwargs = dict(CONVERTER_KWARGS.get(converter, {}))
  expected, state = _random_state(converter, **kwargs)
  model = models.build(name, 3, **kwargs)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  variables = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32),
                                     shapes)
  filled = weights.vgg16_into(name, variables, state, **kwargs)
  for collection, tree in expected.items():
    got = dict(jax.tree_util.tree_leaves_with_path(
        convert.tree_lookup(filled[collection], path)))
    for key, leaf in jax.tree_util.tree_leaves_with_path(tree):
      np.testing.assert_array_equal(got[key], leaf)
  # The rest (zeros here) is untouched and the structure is the model's.
  assert (jax.tree_util.tree_structure(filled)
          == jax.tree_util.tree_structure(weights._to_dicts(variables)))
  head = {k: v for k, v in filled["params"].items() if k != path[0]}
  assert not any(np.any(l) for l in jax.tree_util.tree_leaves(head))
  small = models.build(name, 3, widths=(4,) * 5, **kwargs)
  with pytest.raises(CheckpointError, match="paper's widths"):
    weights.vgg16_into(name, jax.eval_shape(lambda: small.init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)), state,
                       **kwargs)


def test_vgg16_fc_parity(torch):
  """FCN's trunk = torchvision vgg16 up to fc7's ReLU, at 224 x 224."""
  import torchvision
  net = torchvision.models.vgg16().eval()
  x, images = _input(torch, 224, 224)
  with torch.no_grad():
    pool5 = net.features(x)
    fc7 = net.classifier[:5](torch.flatten(net.avgpool(pool5), 1))
  variables = convert.from_torch("vgg16_fc", net.state_dict())
  # "same" alignment: pool5 is 7x7 and the centre of the 'same' 7x7 fc6
  # sees all of it, like the Linear layer.
  outputs = _apply(fcn.VGGFC(alignment="same"), variables, images)
  err5 = relative_error(outputs["pool5"], _nhwc(pool5))
  err7 = relative_error(outputs["fc7"][0, 3, 3], fc7.numpy()[0])
  print(f"vgg16_fc pool5 rel err {err5:.2e}, fc7 {err7:.2e}")
  assert err5 <= CONVERSION_RTOL and err7 <= CONVERSION_RTOL
  # The same weights in fcn32s (Caffe alignment) run end to end.
  model = models.build("fcn32s", 5)
  init = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
  init = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), init)
  filled = weights.vgg16_into("fcn32s", init, net.state_dict())
  assert filled["params"]["score_fr"]["kernel"].shape == (1, 1, 4096, 5)
  np.testing.assert_array_equal(
      filled["params"]["backbone"]["fc6"]["kernel"],
      variables["params"]["fc6"]["kernel"])


# --- torchvision ResNets into the ResNet DeepLab models ---------------------

RESNET50 = (3, 4, 6, 3)


def _zeros_like_model(model, size=32):
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
  return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32),
                                shapes)


@pytest.mark.parametrize("name,converter,kwargs", [
    ("deeplab_v2", "resnet101", {}),  # the default: ResNet-101 at OS 8
    ("deeplab_v3", "resnet50", dict(stage_sizes=RESNET50)),
    ("deeplab_v3_plus", "resnet50", dict(stage_sizes=RESNET50,
                                         output_stride=8)),
])
def test_resnet_into_fills_the_backbone_only(name, converter, kwargs):
  expected, state = _random_state(converter)
  state["fc.weight"] = np.zeros((1000, 2048), np.float32)  # ImageNet head
  state["fc.bias"] = np.zeros((1000,), np.float32)
  model = models.build(name, 3, **kwargs)
  variables = _zeros_like_model(model)
  filled = weights.resnet_into(name, variables, state)
  for collection, tree in expected.items():
    got = dict(jax.tree_util.tree_leaves_with_path(
        filled[collection]["backbone"]))
    for key, leaf in jax.tree_util.tree_leaves_with_path(tree):
      np.testing.assert_array_equal(got[key], leaf)
  # The heads (zeros here) are untouched and the structure is the model's.
  assert (jax.tree_util.tree_structure(filled)
          == jax.tree_util.tree_structure(weights._to_dicts(variables)))
  heads = {k: v for k, v in filled["params"].items() if k != "backbone"}
  assert heads and not any(np.any(l) for l in jax.tree_util.tree_leaves(heads))


def test_resnet_into_says_how_to_fix_mismatches():
  _, state50 = _random_state("resnet50")
  model101 = models.build("deeplab_v3", 3)
  with pytest.raises(CheckpointError, match=r"stage_sizes=\(3, 4, 6, 3\)"):
    weights.resnet_into("deeplab_v3", _zeros_like_model(model101), state50)
  narrow = models.build("deeplab_v3", 3, stage_sizes=RESNET50, width=8)
  with pytest.raises(CheckpointError, match="width"):
    weights.resnet_into("deeplab_v3", _zeros_like_model(narrow), state50)
  tiny = models.build("deeplab_v2", 3, stage_sizes=(1, 1, 1, 1), width=4)
  with pytest.raises(CheckpointError, match="ResNet-50"):
    weights.resnet_into("deeplab_v2", _zeros_like_model(tiny), state50)
  with pytest.raises(ConfigError, match="deeplab_v3_plus"):
    weights.resnet_into("unet", {}, state50)


def test_resnet_into_parity(torch):
  """The filled backbone at OS 8 is torchvision's dilated resnet50."""
  import torchvision
  net = _randomise_bn(torch, torchvision.models.resnet50(
      replace_stride_with_dilation=[False, True, True]))
  x, images = _input(torch, 65, 77)
  with torch.no_grad():
    y = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    c2 = net.layer1(y)
    c5 = net.layer4(net.layer3(net.layer2(c2)))
  # multi_grid=None: torchvision's rates (the paper's (1, 2, 4) differ).
  model = models.build("deeplab_v3_plus", 3, stage_sizes=RESNET50,
                       output_stride=8, multi_grid=None)
  variables = weights.resnet_into(
      "deeplab_v3_plus", _zeros_like_model(model), net.state_dict())
  with jax.default_matmul_precision("highest"):
    _, state = jax.jit(lambda v, x: model.apply(
        v, x, capture_intermediates=True, mutable=["intermediates"]))(
            variables, images)
  features = state["intermediates"]["backbone"]["__call__"][0]
  for key, value in (("c2", c2), ("c5", c5)):
    err = relative_error(features[key], _nhwc(value))
    print(f"resnet_into deeplab_v3_plus {key}: rel err {err:.2e}")
    assert err <= CONVERSION_RTOL, key
