"""FCN-ResNet50 (torchvision's layout) on the built-in segjax_shapes dataset (CPU-sized).

    segjax train --config configs/fcn_resnet50_shapes.py --workdir workdir/fcn_resnet50_shapes

A narrow ResNet (width 16, one block per stage) so it trains on a 2-core
CPU; the VOC config has the real ResNet-50.

The dataset's trainer settings (crop, schedule, batch, evaluation) are
segjax.config.base_config("segjax_shapes"); this file states the model and what
it changes.
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("segjax_shapes")
  c.model = "fcn_resnet50"
  c.model_kwargs = ml_collections.ConfigDict(dict(stage_sizes=(1, 1, 1, 1), width=16, aux=False))
  return apply_mode(c, mode)
