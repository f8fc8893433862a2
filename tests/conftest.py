"""Test set-up: JAX sees 8 CPU devices, so sharding code runs as on a pod.

XLA reads the flag once, when JAX is first imported, so it is set here before
any test module imports jax.

The comparison tests need PyTorch and friends (the `parity` extra). Where they
are not installed those tests skip, except in CI (`CI` set), where a missing
package fails the test that needs it: CI proves parity, it never skips it.
"""
import importlib
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# torch goes first: loaded after TensorFlow, its LLVM options clash with
# TensorFlow's and the process dies (seen with torch 2.14 and TF 2.21).
try:
  import torch  # noqa: E402,F401  pylint: disable=unused-import
except ImportError:
  pass

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_DATASET = "segjax_shapes/small"


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
  """A tfds data dir holding the small segjax_shapes config (generated once)."""
  from segjax.data.builders import load_builder
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  load_builder(SMALL_DATASET, data_dir)
  return data_dir


def needs(module):
  """Imports `module` for a comparison test: a skip, or in CI a failure.

  Returns the module, like `pytest.importorskip`.
  """
  if os.environ.get("CI"):
    try:
      return importlib.import_module(module)
    except ImportError as err:
      pytest.fail(f"CI runs every comparison test, but {module} is not "
                  f"installed ({err}): pip install -e '.[test,parity]'")
  return pytest.importorskip(module)


def train_argv(data_dir, workdir, *extra):
  """`segjax train` arguments: the tiny U-Net on the small dataset, plus `extra`."""
  return ["train", "--config", os.path.join(REPO, "configs", "unet_shapes.py:tiny"),
          "--workdir", str(workdir), f"--config.dataset={SMALL_DATASET}",
          f"--config.data_dir={data_dir}", *extra]


def tiny_config(data_dir, *overrides):
  """configs/unet_shapes.py:tiny on the small dataset, plus overrides."""
  from segjax import config as config_lib
  return config_lib.load_config(
      os.path.join(REPO, "configs", "unet_shapes.py:tiny"),
      [f"dataset={SMALL_DATASET}", f"data_dir={data_dir}", *overrides])
