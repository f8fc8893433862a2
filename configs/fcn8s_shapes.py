"""FCN-8s (Long et al. 2015) on the built-in segjax_shapes dataset (CPU-sized).

    segjax train --config configs/fcn8s_shapes.py --workdir workdir/fcn8s_shapes

VGG16's layout with narrow widths (16 ... 128) and fc6/fc7 of 256 channels
so it trains on a 2-core CPU; the 'same' alignment (padded, output = input
size) suits the 64x64 crops; score layers start at zero and the upsamplings
bilinear, as in the paper.

The dataset's trainer settings (crop, schedule, batch, evaluation) are
segjax.config.base_config("segjax_shapes"); this file states the model and what
it changes.
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("segjax_shapes")
  c.model = "fcn8s"
  c.model_kwargs = ml_collections.ConfigDict(dict(alignment="same", widths=(16, 32, 64, 128, 128), fc_width=256))
  return apply_mode(c, mode)
