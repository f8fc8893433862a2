"""DeconvNet (Noh et al. 2015) on the built-in segjax_shapes dataset (CPU-sized).

    segjax train --config configs/deconvnet_shapes.py --workdir workdir/deconvnet_shapes

VGG16-BN + fc6/fc7 and the mirrored deconvolution network with narrow widths
(16 ... 128, fc 256) for a 2-core CPU. Inputs are padded to at least 224
pixels (fc6 is a 7x7 valid conv on pool5), so this is the slowest of the
shapes configs.

The dataset's trainer settings (crop, schedule, batch, evaluation) are
segjax.config.base_config("segjax_shapes"); this file states the model and what
it changes.
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("segjax_shapes")
  c.model = "deconvnet"
  c.model_kwargs = ml_collections.ConfigDict(dict(widths=(16, 32, 64, 128, 128), fc_width=256))
  return apply_mode(c, mode)
