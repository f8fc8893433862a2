"""Every file in configs/ loads, validates and builds its model."""
import glob
import os

import jax
import jax.numpy as jnp
import pytest

from segjax import config as config_lib
from segjax import models
from segjax.data import instances
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


# (height, width) of an evaluation image of each dataset, scaled down as the
# end-to-end tests' fake downloads have them (tests/data/fake_downloads.py).
EVAL_SHAPES = {
    "segjax_shapes": (64, 64), "voc2012_segmentation": (75, 100),
    "pascal_context": (100, 75), "cityscapes": (32, 64), "ade20k": (85, 64),
    "coco_instances": (48, 64),
}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_tiny_keeps_the_recipe_and_the_evaluation_protocol(path):
  full = config_lib.load_config(path)
  tiny = config_lib.load_config(path + ":tiny")
  assert tiny.model == full.model and tiny.dataset == full.dataset
  assert tiny.num_classes == full.num_classes and tiny.loss == full.loss
  assert tiny.optimizer.name == full.optimizer.name
  assert tiny.optimizer.schedule == full.optimizer.schedule
  assert (tiny.train.steps, tiny.train.batch_size) == (4, 8)
  # The same inference: mode, scales, flips, windows as large relative to
  # the training crop as the experiment's.
  assert tiny.eval.mode == full.eval.mode
  assert tuple(tiny.eval.scales) == tuple(full.eval.scales)
  assert tiny.eval.flip == full.eval.flip
  for key in ("crop_size", "stride", "resize_to"):
    assert (tiny.eval[key] is None) == (full.eval[key] is None), key
    if full.eval[key] is not None:
      ratio = full.eval[key][0] / full.image_size[0]
      assert abs(tiny.eval[key][0] / tiny.image_size[0] - ratio) < 0.05, key
  if tiny.eval.mode == "slide":
    assert max(tiny.eval.crop_size) <= max(tiny.image_size)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_tiny_model_traces_on_its_datasets_images(path):
  """The tiny model on what its evaluation feeds it: windows of an image of
  its dataset (an odd size, on a bucketed canvas)."""
  tiny = config_lib.load_config(path + ":tiny")
  model = models.build(tiny.model, num_classes=tiny.num_classes, **tiny.model_kwargs)
  if models.task(tiny.model) == "instance":
    # Detectors place every image on their canvas (config.instances), one
    # per orientation where they group by it (both traced, batch 1 and 2).
    canvases = instances.settings(tiny).canvases
    windows = canvases[0]
    if len(canvases) > 1:
      jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                     jnp.zeros((1, *canvases[1], 3), jnp.float32))
  else:
    h, w = EVAL_SHAPES[tiny.dataset.partition("/")[0]]
    bucket = tiny.eval.bucket
    canvas = (-(-h // bucket) * bucket, -(-w // bucket) * bucket)
    windows = (tiny.eval.crop_size if tiny.eval.mode == "slide"
               else tiny.eval.resize_to or canvas)
    windows = tuple(min(a, b) for a, b in zip(windows, canvas))
  # One trace, no compilation: init runs the forward pass on these inputs.
  out, variables = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.PRNGKey(0), x, train=False),
      jnp.zeros((2, *windows, 3), jnp.float32))
  assert jax.tree_util.tree_leaves(variables["params"])
  if models.task(tiny.model) == "semantic":
    assert out["logits"].shape == (2, *windows, tiny.num_classes)


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


def test_coco_recipe_groups_by_orientation_as_the_readme_says():
  """configs/mask_rcnn_r50_fpn_coco.py: 800 x 1344 and 1344 x 800 canvases
  (the tiny run crosses both and counts one compilation per canvas:
  tests/e2e/test_coco.py); README's Mask R-CNN section says so."""
  path = os.path.join(os.path.dirname(__file__), "..", "configs", "mask_rcnn_r50_fpn_coco.py")
  assert instances.settings(config_lib.load_config(path)).canvases == ((800, 1344),
                                                                      (1344, 800))
  single = config_lib.load_config(path, ["instances.group_by_aspect=False"])
  assert instances.settings(single).canvases == ((1344, 1344),)
  with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as f:
    readme = f.read()
  section = readme[readme.index("### Mask R-CNN"):readme.index("### Experiment configs")]
  for claim in ("800×1344", "1344×800", "`instances.group_by_aspect`",
                "one compiled train step per canvas"):
    assert claim in " ".join(section.split()), claim
