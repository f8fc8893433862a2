"""SegNet (Badrinarayanan et al. 2017) on the built-in segjax_shapes dataset (CPU-sized).

    segjax train --config configs/segnet_shapes.py --workdir workdir/segnet_shapes

The VGG16-BN encoder / index-unpooling decoder with narrow widths (16 ...
128) for a 2-core CPU.

The dataset's trainer settings (crop, schedule, batch, evaluation) are
segjax.config.base_config("segjax_shapes"); this file states the model and what
it changes.
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("segjax_shapes")
  c.model = "segnet"
  c.model_kwargs = ml_collections.ConfigDict(dict(widths=(16, 32, 64, 128, 128)))
  return apply_mode(c, mode)
