"""ParseNet (Liu et al. 2015) on the built-in segjax_shapes dataset (CPU-sized).

    segjax train --config configs/parsenet_shapes.py --workdir workdir/parsenet_shapes

The DeepLab-LargeFOV trunk with narrow widths for a 2-core CPU, plus global
context: global average pooling, L2 normalisation with learned scales,
unpooling and concatenation.

The dataset's trainer settings (crop, schedule, batch, evaluation) are
segjax.config.base_config("segjax_shapes"); this file states the model and what
it changes.
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("segjax_shapes")
  c.model = "parsenet"
  c.model_kwargs = ml_collections.ConfigDict(dict(widths=(16, 32, 64, 128, 128), fc_width=256))
  return apply_mode(c, mode)
