"""UNet++ (Zhou et al. 2018) on the built-in segjax_shapes dataset (CPU-sized).

    segjax train --config configs/unet_pp_shapes.py --workdir workdir/unet_pp_shapes

Base width 16 (the paper's 32 halved for a 2-core CPU), depth 4, deep
supervision: the loss is that of the averaged heads plus the mean over the
four heads (loss.kwargs.aux_weight=1).

The dataset's trainer settings (crop, schedule, batch, evaluation) are
segjax.config.base_config("segjax_shapes"); this file states the model and what
it changes.
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("segjax_shapes")
  c.model = "unet_pp"
  c.model_kwargs = ml_collections.ConfigDict(dict(depth=4, base_width=16, deep_supervision=True))
  c.loss.kwargs.aux_weight = 1.0
  return apply_mode(c, mode)
