"""No option silently ignored: every key the code reads is declared once, with
its default in one place; the CRF's de-normalisation follows augment.mean/std;
.safetensors weights read with the base install."""
import ast
import glob
import os
import sys

import numpy as np
import pytest

from conftest import REPO
from segjax import config as config_lib
from segjax.errors import ConfigError

FAMILIES = ("segjax_shapes", "voc", "ade20k", "cityscapes", "coco")
# The names the code gives a config block it reads options from.
CONFIG_NAMES = ("config", "opt", "eval_config", "cfg")


def test_data_cache_below_is_declared_and_overridable():
  config = config_lib.load_config(os.path.join(REPO, "configs", "unet_shapes.py"),
                                  ["data.cache_below=8"])
  assert config.data.cache_below == 8


def test_every_family_declares_the_shared_defaults():
  for family in FAMILIES:
    c = config_lib.base_config(family)
    for block, defaults in config_lib.DEFAULTS.items():
      assert set(defaults) <= set(c[block]), (family, block)
  assert config_lib.base_config("coco").optimizer.milestones == (60000, 80000)


def _config_reads_with_a_default():
  """`<config block>.get(key, default)` calls in segjax/: a default of the
  code's own, which can differ from the config's (max_nonfinite_steps was 10
  in the config and 0 in the loop)."""
  found = []
  for path in glob.glob(os.path.join(REPO, "segjax", "**", "*.py"), recursive=True):
    with open(path) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == "get" and len(node.args) == 2):
        root = node.func.value
        while isinstance(root, ast.Attribute):
          root = root.value
        if isinstance(root, ast.Name) and root.id in CONFIG_NAMES:
          found.append(f"{os.path.relpath(path, REPO)}:{node.lineno}")
  return found


def test_the_code_has_no_config_defaults_of_its_own():
  assert _config_reads_with_a_default() == []
  # The defaults it falls back on (hand-built blocks) are the config's.
  assert config_lib.option({}, "train", "max_nonfinite_steps") == \
      config_lib.base_config().train.max_nonfinite_steps == 10
  from segjax.train import optim
  import ml_collections
  opt = ml_collections.ConfigDict(dict(name="sgd", learning_rate=1.0, schedule="poly",
                                       warmup_steps=0, weight_decay=0.0, momentum=0.0))
  _, schedule = optim.make_optimizer(opt, 10)
  # end_factor 0.01, as the base config declares (the code used to end at 0).
  np.testing.assert_allclose(float(schedule(10)), 0.01, rtol=1e-6)


def test_crf_denormalises_with_the_configs_augment_mean_std():
  from segjax.train import loop
  config = config_lib.load_config(
      os.path.join(REPO, "configs", "deeplab_v1_shapes.py:tiny"), ["model_kwargs.crf=True"])
  model = loop.build_model(config)
  assert tuple(model.mean) == tuple(config.augment.mean) == (127.5,) * 3
  assert tuple(model.std) == tuple(config.augment.std) == (64.0,) * 3
  config.augment.mean = (100.0, 110.0, 120.0)
  assert tuple(loop.build_model(config).mean) == (100.0, 110.0, 120.0)
  # A second, different source is refused rather than silently preferred.
  config.model_kwargs.mean = (1.0, 2.0, 3.0)
  with pytest.raises(ConfigError, match="augment.mean"):
    loop.build_model(config)
  # Models without the CRF take no mean/std.
  unet = config_lib.load_config(os.path.join(REPO, "configs", "unet_shapes.py:tiny"))
  loop.build_model(unet)


def test_safetensors_is_a_base_dependency_and_reads(tmp_path):
  if sys.version_info >= (3, 11):
    import tomllib
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
      project = tomllib.load(f)["project"]
    assert any(d.startswith("safetensors") for d in project["dependencies"])
  from safetensors.numpy import save_file
  from segjax import weights
  tensors = {"conv.weight": np.arange(6, dtype=np.float32).reshape(1, 2, 3)}
  save_file(tensors, str(tmp_path / "w.safetensors"))
  got = weights.load_state_dict(str(tmp_path / "w.safetensors"))
  np.testing.assert_array_equal(got["conv.weight"], tensors["conv.weight"])
