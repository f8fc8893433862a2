"""`segjax convert`: weight files in, init_from checkpoints out; torchvision
ImageNet ResNets into the Mask and Faster R-CNN variants (weights.resnet_into)."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import needs
from segjax import cli, convert, models, weights
from segjax.errors import CheckpointError
from segjax.models.detection.networks import MaskRCNNNetworks
from segjax.train import checkpoint

from test_convert import (  # pylint: disable=import-error
    CONVERSION_RTOL, _input, _nhwc, _random_state, _randomise_bn, relative_error)


def _run(capsys, *argv):
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def _assert_tree_equal(got, want):
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def resnet50_npz(tmp_path_factory):
  _, state = _random_state("resnet50")
  state["fc.weight"] = np.zeros((1000, 2048), np.float32)  # ImageNet head: dropped
  state["fc.bias"] = np.zeros((1000,), np.float32)
  path = str(tmp_path_factory.mktemp("weights") / "resnet50.npz")
  np.savez(path, **state)
  return path, state


def test_backbone_weights_become_an_init_checkpoint(resnet50_npz, tmp_path, capsys):
  path, state = resnet50_npz
  out = str(tmp_path / "init")
  code, printed, err = _run(capsys, "convert", "--model", "deeplab_v3_resnet50",
                            "--num_classes", "5", "--weights", path, "--output", out)
  assert code == 0, err
  assert "init_from" in printed
  restored = checkpoint.restore_on_host(os.path.join(out, "checkpoints", "0"))
  # Only the backbone: the trainer initialises the ASPP and classifier.
  assert set(restored["params"]) == {"backbone"}
  want = convert.from_torch("resnet50", state)
  _assert_tree_equal(restored["params"]["backbone"], want["params"])
  _assert_tree_equal(restored["batch_stats"]["backbone"], want["batch_stats"])
  # A second conversion into the same place is refused, the first kept.
  code, _, err = _run(capsys, "convert", "--model", "deeplab_v3_resnet50",
                      "--num_classes", "5", "--weights", path, "--output", out)
  assert code == 2 and "already exists" in err
  assert checkpoint.restore_on_host(os.path.join(out, "checkpoints", "0"))


def test_whole_model_weights_from_a_config(tmp_path, capsys):
  variables, state = _random_state("fcn_resnet50", num_classes=21, aux=True)
  path = str(tmp_path / "fcn.npz")
  np.savez(path, **state)
  out = str(tmp_path / "init")
  code, _, err = _run(capsys, "convert", "--config", "configs/fcn_resnet50_voc.py",
                      "--weights", path, "--output", out)
  assert code == 0, err
  restored = checkpoint.restore_on_host(os.path.join(out, "checkpoints", "0"))
  _assert_tree_equal(restored["params"], variables["params"])


@pytest.mark.parametrize("name,content,message", [
    ("missing.npz", None, "does not exist"),
    ("weights.ckpt", b"x", "unknown kind"),
    ("broken.npz", b"not a zip file", "unreadable"),
])
def test_bad_weight_files(tmp_path, capsys, name, content, message):
  path = tmp_path / name
  if content is not None:
    path.write_bytes(content)
  code, _, err = _run(capsys, "convert", "--model", "deeplab_v3_resnet50", "--num_classes",
                      "5", "--weights", str(path), "--output", str(tmp_path / "out"))
  assert code == 2 and message in err
  assert not (tmp_path / "out").exists()


def test_model_without_pytorch_weights_and_missing_arguments(resnet50_npz, tmp_path, capsys):
  path, _ = resnet50_npz
  code, _, err = _run(capsys, "convert", "--model", "unet", "--num_classes", "3",
                      "--weights", path, "--output", str(tmp_path / "out"))
  assert code == 2 and "no PyTorch weights map onto 'unet'" in err
  code, _, err = _run(capsys, "convert", "--weights", path, "--output", str(tmp_path / "o"))
  assert code == 2 and "--config" in err


def test_pth_files_need_torch(resnet50_npz, tmp_path, capsys):
  torch = needs("torch")
  _, state = resnet50_npz
  path = str(tmp_path / "resnet50.pth")
  torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}}, path)
  code, _, err = _run(capsys, "convert", "--model", "fcn_resnet50", "--num_classes", "5",
                      "--weights", path, "--output", str(tmp_path / "init"))
  assert code == 0, err


def test_init_from_takes_the_converted_backbone_and_keeps_the_heads(resnet50_npz, tmp_path,
                                                                    capsys):
  from segjax.train.state import TrainState
  path, state = resnet50_npz
  out = str(tmp_path / "init")
  config = "configs/deeplab_v3_voc.py"
  code, _, err = _run(capsys, "convert", "--config", config, "--weights", path,
                      "--output", out)
  assert code == 2 and "blocks per stage" in err  # ResNet-101 model, ResNet-50 weights
  code, _, err = _run(capsys, "convert", "--config", config, "--weights", path, "--output",
                      out, "--config.model_kwargs.stage_sizes=(3, 4, 6, 3)")
  assert code == 0, err
  # What `segjax train` does with --config.init_from=out, on a fresh state.
  model = models.build("deeplab_v3", 21, stage_sizes=(3, 4, 6, 3))
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                          jnp.zeros((1, 64, 64, 3)))
  ones = jax.tree_util.tree_map(lambda s: np.ones(s.shape, np.float32), shapes)
  fresh = TrainState(step=np.int32(0), params=ones["params"],
                     batch_stats=ones["batch_stats"], opt_state=(), nonfinite=np.int32(0))
  loaded = checkpoint.load_init(out, fresh)
  want = convert.from_torch("resnet50", state)
  _assert_tree_equal(loaded.params["backbone"], want["params"])
  _assert_tree_equal(loaded.batch_stats["backbone"], want["batch_stats"])
  _assert_tree_equal(loaded.params["aspp"], fresh.params["aspp"])  # heads: initial values


# --- torchvision ImageNet ResNets into the Mask and Faster R-CNN variants -----

DETECTORS = sorted(models.DETECTORS)
# The Faster R-CNN variants take their Mask R-CNN twins' RESNET_BACKBONES
# entries (the same layout): the two R-50s stand for the four in the
# slower test below.
FILLED = [n for n in DETECTORS if n.startswith("mask_rcnn_")] + [
    "faster_rcnn_r50_c4", "faster_rcnn_r50_fpn"]


@pytest.fixture(scope="module")
def resnet_state():
  """converter -> (its converted variables, a torchvision-layout state dict
  with the ImageNet fc), random values, made once per module (ResNet-101
  takes about a second)."""
  @functools.lru_cache(maxsize=None)
  def make(converter):
    expected, state = _random_state(converter)
    state["fc.weight"] = np.zeros((1000, 2048), np.float32)
    state["fc.bias"] = np.zeros((1000,), np.float32)
    return expected, state
  yield make
  make.cache_clear()


def _zero_detector(name, **kwargs):
  """Zero variables of a full-size Mask R-CNN variant (eval_shape at 64 x 64)."""
  model = models.build(name, 5, **kwargs)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
  return model, jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), shapes)


def _resnet_location(name, key):
  """Where leaf `key` of backbones.resnet.ResNet's variables lives in Mask R-CNN `name`.

  FPN: under backbone/body; C4: layer4 in the ROI head res5, the rest under
  backbone.
  """
  if name.endswith("_c4"):
    return (("res5",) if key[0].startswith("layer4_") else ("backbone",)) + key
  return ("backbone", "body") + key


def _conv(state, key):
  return state[f"{key}.weight"].transpose(2, 3, 1, 0)  # OIHW -> HWIO


@pytest.mark.parametrize("name,frozen_bn", [(name, True) for name in FILLED] + [
    ("mask_rcnn_r50_fpn", False), ("mask_rcnn_r50_c4", False)])
def test_resnet_into_fills_every_mask_rcnn_backbone(resnet_state, name, frozen_bn):
  converter = "resnet101" if "_r101_" in name else "resnet50"
  expected, state = resnet_state(converter)
  _, variables = _zero_detector(name, frozen_bn=frozen_bn)
  filled = weights.resnet_into(name, variables, state)
  assert (jax.tree_util.tree_structure(filled)
          == jax.tree_util.tree_structure(weights._to_dicts(variables)))
  got = traverse_util.flatten_dict(filled)
  want = {}
  for collection, tree in expected.items():
    for key, leaf in traverse_util.flatten_dict(tree).items():
      want[(collection,) + _resnet_location(name, key)] = leaf
  # Every ResNet leaf of the model, params and BN statistics, is filled ...
  if name.endswith("_c4"):
    resnet = {p for p in got if p[1] in ("backbone", "res5")}
  else:
    resnet = {p for p in got if p[1:3] == ("backbone", "body")}
  assert resnet == set(want)
  for path, leaf in got.items():
    if path in want:
      np.testing.assert_array_equal(leaf, want[path], err_msg=str(path))
    else:  # ... and FPN, RPN and ROI heads keep their values (zeros here).
      assert not np.any(leaf), path
  # Spot checks against the torch tensors themselves.
  body = ("backbone",) if name.endswith("_c4") else ("backbone", "body")
  res5 = ("res5",) if name.endswith("_c4") else body
  last = 22 if converter == "resnet101" else 5
  checks = [
      (("params",) + body + ("conv1", "kernel"), _conv(state, "conv1")),
      (("batch_stats",) + body + ("bn1", "mean"), state["bn1.running_mean"]),
      (("params",) + body + (f"layer3_{last}", "conv2", "kernel"),
       _conv(state, f"layer3.{last}.conv2")),
      (("batch_stats",) + body + (f"layer3_{last}", "bn2", "var"),
       state[f"layer3.{last}.bn2.running_var"]),
      (("params",) + res5 + ("layer4_0", "downsample_conv", "kernel"),
       _conv(state, "layer4.0.downsample.0")),
      (("params",) + res5 + ("layer4_1", "bn1", "scale"), state["layer4.1.bn1.weight"]),
      (("batch_stats",) + res5 + ("layer4_2", "bn3", "var"),
       state["layer4.2.bn3.running_var"]),
  ]
  for path, value in checks:
    np.testing.assert_array_equal(got[path], value, err_msg=str(path))


@pytest.mark.parametrize("name", DETECTORS)
def test_resnet_into_mask_rcnn_needs_the_models_depth(resnet_state, name):
  other = "resnet50" if "_r101_" in name else "resnet101"
  _, variables = _zero_detector(name)
  with pytest.raises(CheckpointError, match="blocks per stage"):
    weights.resnet_into(name, variables, resnet_state(other)[1])


def test_resnet_into_mask_rcnn_says_what_does_not_fit(resnet_state):
  _, state = resnet_state("resnet50")
  _, narrow = _zero_detector("mask_rcnn_r50_c4", width=16)
  with pytest.raises(CheckpointError, match="width"):
    weights.resnet_into("mask_rcnn_r50_c4", narrow, state)
  _, tiny = _zero_detector("mask_rcnn_r50_fpn", stage_sizes=(1, 1, 1, 1), width=16)
  with pytest.raises(CheckpointError, match="ResNet-50"):
    weights.resnet_into("mask_rcnn_r50_fpn", tiny, state)
  # A whole detection checkpoint is not an ImageNet backbone.
  _, variables = _zero_detector("mask_rcnn_r50_fpn")
  whole = {f"backbone.body.{k}": v for k, v in state.items()}
  with pytest.raises(CheckpointError, match="not a torchvision ImageNet ResNet"):
    weights.resnet_into("mask_rcnn_r50_fpn", variables, whole)


@pytest.mark.parametrize("name", ["mask_rcnn_r50_fpn", "mask_rcnn_r50_c4"])
def test_imagenet_resnet_becomes_a_mask_rcnn_init_checkpoint(resnet50_npz, tmp_path, capsys,
                                                             name):
  path, state = resnet50_npz
  out = str(tmp_path / "init")
  code, _, err = _run(capsys, "convert", "--model", name, "--num_classes", "91",
                      "--weights", path, "--output", out)
  assert code == 0, err
  restored = checkpoint.restore_on_host(os.path.join(out, "checkpoints", "0"))
  want = convert.from_torch("resnet50", state)
  for collection in ("params", "batch_stats"):
    # Only the ResNet (C4: backbone and res5; FPN: backbone/body), the
    # ImageNet fc dropped: the trainer initialises FPN, RPN and heads.
    got = traverse_util.flatten_dict(restored[collection])
    expect = {_resnet_location(name, k): v
              for k, v in traverse_util.flatten_dict(want[collection]).items()}
    assert set(got) == set(expect)
    for key, value in expect.items():
      np.testing.assert_array_equal(got[key], value)


def test_resnet_into_mask_rcnn_c4_parity():
  """C4 and res5 of an imported resnet50 are torchvision's layer3 and layer4.

  (The FPN variants' body is the ResNet that test_convert's
  test_resnet_into_parity and detection/test_maskrcnn_parity already check.)
  """
  torch = needs("torch")
  torchvision = needs("torchvision")
  torch.manual_seed(0)
  torch.set_num_threads(1)
  net = _randomise_bn(torch, torchvision.models.resnet50())
  x, images = _input(torch, 65, 77)
  rois = torch.randn(3, 1024, 14, 14, generator=torch.Generator().manual_seed(3))
  with torch.no_grad():
    c4 = net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x)))))))
    res5 = net.layer4(rois)
  model, variables = _zero_detector("mask_rcnn_r50_c4")
  variables = weights.resnet_into("mask_rcnn_r50_c4", variables, net.state_dict())
  with jax.default_matmul_precision("highest"):
    feats = jax.jit(lambda v, x: model.apply(v, x, method=MaskRCNNNetworks.features))(
        variables, images)
    ours = jax.jit(lambda v, r: model.apply(v, r, method=lambda m, r: m.res5(r)))(
        variables, jnp.asarray(_nhwc(rois)))
  for key, a, b in (("c4", feats["c4"], c4), ("res5", ours, res5)):
    err = relative_error(a, _nhwc(b))
    print(f"resnet_into mask_rcnn_r50_c4 {key}: rel err {err:.2e}")
    # README "Parity tests": C4 features and the res5 head "to 2e-6
    # relative" (measured 1.5e-6 and 1.0e-6).
    assert err <= CONVERSION_RTOL, key
