"""Every file in configs/ loads, validates and builds its model."""
import glob
import os

import jax
import jax.numpy as jnp
import pytest

from segjax import config as config_lib
from segjax import models
from segjax.errors import ConfigError

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.py")))


def test_there_are_configs():
  assert any(path.endswith("unet_shapes.py") for path in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads_and_builds_its_model(path):
  config = config_lib.load_config(path)
  model = models.build(config.model, num_classes=config.num_classes, **config.model_kwargs)
  # eval_shape traces init without compiling or allocating the weights.
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                          jnp.zeros((1, *config.image_size, 3), jnp.float32))
  assert jax.tree_util.tree_leaves(shapes["params"])
  tiny = config_lib.load_config(path + ":tiny")
  assert tiny.train.steps < config.train.steps


def test_base_config_refuses_unknown_family_and_mode():
  with pytest.raises(ConfigError, match="dataset family"):
    config_lib.base_config("kitti")
  with pytest.raises(ConfigError, match="mode"):
    config_lib.apply_mode(config_lib.base_config("voc"), "huge")


def test_model_and_loss_options_can_be_added_on_the_command_line():
  path = os.path.join(os.path.dirname(__file__), "..", "configs", "deeplab_v3_voc.py")
  config = config_lib.load_config(path, ["model_kwargs.stage_sizes=(3, 4, 6, 3)",
                                         "loss.kwargs.aux_weight=0.4",
                                         "model_kwargs.output_stride=8"])
  assert config.model_kwargs.stage_sizes == (3, 4, 6, 3)
  assert config.model_kwargs.output_stride == 8 and config.loss.kwargs.aux_weight == 0.4
  # Other sections stay closed: a typo there is refused at once.
  with pytest.raises(ConfigError, match="does not exist"):
    config_lib.load_config(path, ["train.stepz=3"])
  # A wrong model option is refused when the model is built, with the valid ones.
  config = config_lib.load_config(path, ["model_kwargs.widht=3"])
  with pytest.raises(ConfigError, match="no option"):
    models.build(config.model, config.num_classes, **config.model_kwargs)
