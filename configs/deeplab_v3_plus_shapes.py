"""DeepLab v3+ (Chen et al. 2018) on the built-in segjax_shapes dataset (CPU-sized).

    segjax train --config configs/deeplab_v3_plus_shapes.py --workdir workdir/deeplab_v3_plus_shapes

A narrow ResNet (width 16, one block per stage) at output stride 16, a
64-channel ASPP and the stride-4 decoder (24 low-level, 64 decoder
channels).

The dataset's trainer settings (crop, schedule, batch, evaluation) are
segjax.config.base_config("segjax_shapes"); this file states the model and what
it changes.
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("segjax_shapes")
  c.model = "deeplab_v3_plus"
  c.model_kwargs = ml_collections.ConfigDict(dict(stage_sizes=(1, 1, 1, 1), width=16, multi_grid=None, aspp_channels=64, low_level_channels=24, decoder_channels=64))
  return apply_mode(c, mode)
