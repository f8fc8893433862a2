"""`segjax convert`: weight files in, init_from checkpoints out."""
import os

import jax
import numpy as np
import pytest

from segjax import cli, convert
from segjax.train import checkpoint

from test_convert import _random_state  # pylint: disable=import-error


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
  torch = pytest.importorskip("torch")
  _, state = resnet50_npz
  path = str(tmp_path / "resnet50.pth")
  torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}}, path)
  code, _, err = _run(capsys, "convert", "--model", "fcn_resnet50", "--num_classes", "5",
                      "--weights", path, "--output", str(tmp_path / "init"))
  assert code == 0, err


def test_init_from_takes_the_converted_backbone_and_keeps_the_heads(resnet50_npz, tmp_path,
                                                                    capsys):
  import jax.numpy as jnp
  from segjax import models
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
