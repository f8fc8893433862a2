"""Test set-up: JAX sees 8 CPU devices, so sharding code runs as on a pod.

XLA reads the flag once, when JAX is first imported, so it is set here before
any test module imports jax.

The comparison tests need PyTorch and friends (the `parity` extra). Where they
are not installed those tests skip, except in CI (`CI` set), where a missing
package fails the test that needs it: CI proves parity, it never skips it.
"""
import importlib
import os

# LLVM's optimisation off: the tests' programs are small, so compiling them
# is most of the suite's time, and this cuts it by about a third (a Mask
# R-CNN train step: 25 s -> 16 s). XLA's own (HLO) passes, fusion included,
# still run, so the programs are XLA's; only the machine code is simpler.
# (xdist's workers inherit the flags conftest set in the controller: those
# two are set afresh, not repeated.)
XLA_TEST_FLAGS = " ".join(
    [flag for flag in os.environ.get("XLA_FLAGS", "").split()
     if not flag.startswith(("--xla_force_host_platform_device_count=",
                             "--xla_backend_optimization_level="))]
    + ["--xla_backend_optimization_level=0"])


def xla_flags(devices):
  """XLA_FLAGS for a process of the tests that sees `devices` CPU devices."""
  return f"{XLA_TEST_FLAGS} --xla_force_host_platform_device_count={devices}"


os.environ["XLA_FLAGS"] = xla_flags(8)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# JAX's persistent compilation cache, kept in the checkout's .pytest_cache.
# The environment carries it to pytest-xdist's workers and to the `segjax`
# subprocesses the tests start, so a program compiled once (the tiny U-Net's
# train step, built afresh by every CLI run) is read back everywhere after;
# a fresh clone starts cold. Every compilation is cached, however short:
# the tests compile many small programs many times.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(REPO, ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# PyTorch goes first: loaded after TensorFlow, torch's and triton's (which
# torchvision loads) LLVM options clash with TensorFlow's and the process dies
# (seen with torch 2.14, torchvision 0.29 and TF 2.21).
for _module in ("torch", "torchvision"):
  try:
    importlib.import_module(_module)
  except ImportError:
    pass

import pytest  # noqa: E402

SMALL_DATASET = "segjax_shapes/small"


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
  """A tfds data dir holding the small segjax_shapes config (generated once)."""
  from segjax.data.builders import load_builder
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  load_builder(SMALL_DATASET, data_dir)
  return data_dir


def pytest_collection_modifyitems(items):
  """Files marked slow go first, the longest (`slow(seconds=...)`) first.

  pytest-xdist hands out whole files (`--dist loadfile`) in collection order
  (`--no-loadscope-reorder`); starting the longest ones first keeps both
  workers busy to the end.
  """
  def cost(item):
    slow = item.get_closest_marker("slow")
    return -slow.kwargs.get("seconds", 1) if slow else 0
  items.sort(key=cost)


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
