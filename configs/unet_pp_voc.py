"""UNet++ (Zhou et al. 2018) on PASCAL VOC 2012 aug (21 classes).

    segjax train --config configs/unet_pp_voc.py --workdir workdir/unet_pp_voc

The paper's filters (32, 64, 128, 256, 512), depth 4, deep supervision with
a loss on every head; evaluate the averaged ('accurate') output, or set
model_kwargs.prune_level for the faster pruned network.

The dataset's trainer settings (crop, schedule, batch, evaluation) are
segjax.config.base_config("voc"); this file states the model and what
it changes.

Paper's figure: none on VOC; the UNet++ paper reports medical datasets only.
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("voc")
  c.model = "unet_pp"
  c.model_kwargs = ml_collections.ConfigDict(dict(depth=4, base_width=32, deep_supervision=True))
  c.loss.kwargs.aux_weight = 1.0
  return apply_mode(c, mode)
