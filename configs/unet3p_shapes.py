"""UNet 3+ (Huang et al. 2020) on the built-in segjax_shapes dataset (CPU-sized).

    segjax train --config configs/unet3p_shapes.py --workdir workdir/unet3p_shapes

Base width 16 (the paper's 64 quartered for a 2-core CPU), depth 4, full-
scale deep supervision with the paper's hybrid loss (focal + MS-SSIM + IoU)
on the finest head plus the sum over the other four (aux_weight=4).

The dataset's trainer settings (crop, schedule, batch, evaluation) are
segjax.config.base_config("segjax_shapes"); this file states the model and what
it changes.
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("segjax_shapes")
  c.model = "unet3p"
  c.model_kwargs = ml_collections.ConfigDict(dict(depth=4, base_width=16, deep_supervision=True))
  c.loss.name = "unet3p_hybrid"
  c.loss.kwargs.aux_weight = 4.0
  return apply_mode(c, mode)
