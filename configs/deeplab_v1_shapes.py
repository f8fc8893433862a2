"""DeepLab v1 LargeFOV (Chen et al. 2015) on the built-in segjax_shapes dataset (CPU-sized).

    segjax train --config configs/deeplab_v1_shapes.py --workdir workdir/deeplab_v1_shapes

The atrous VGG16 (pool4/pool5 stride 1, conv5 rate 2, fc6 3x3 rate 12) with
narrow widths and a 256-channel fc6/fc7 for a 2-core CPU; set
model_kwargs.crf=True to evaluate with the dense CRF.

The dataset's trainer settings (crop, schedule, batch, evaluation) are
segjax.config.base_config("segjax_shapes"); this file states the model and what
it changes.
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("segjax_shapes")
  c.model = "deeplab_v1"
  c.model_kwargs = ml_collections.ConfigDict(dict(widths=(16, 32, 64, 128, 128), fc_width=256, crf=False))
  return apply_mode(c, mode)
