"""DeepLab v2 (Chen et al. 2017) on the built-in segjax_shapes dataset (CPU-sized).

    segjax train --config configs/deeplab_v2_shapes.py --workdir workdir/deeplab_v2_shapes

A narrow ResNet (width 16, one block per stage) at output stride 8 with the
ASPP-L head (rates 6, 12, 18, 24, summed); set model_kwargs.crf=True to
evaluate with the dense CRF.

The dataset's trainer settings (crop, schedule, batch, evaluation) are
segjax.config.base_config("segjax_shapes"); this file states the model and what
it changes.
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("segjax_shapes")
  c.model = "deeplab_v2"
  c.model_kwargs = ml_collections.ConfigDict(dict(stage_sizes=(1, 1, 1, 1), width=16, crf=False))
  return apply_mode(c, mode)
