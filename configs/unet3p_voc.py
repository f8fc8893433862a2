"""UNet 3+ (Huang et al. 2020) on PASCAL VOC 2012 aug (21 classes).

    segjax train --config configs/unet3p_voc.py --workdir workdir/unet3p_voc

The paper's widths (64 ... 1024, 5 x 64 = 320 decoder channels), full-scale
deep supervision and the hybrid loss (focal + MS-SSIM + IoU) on every head.
The classification-guided module needs image-level labels and is off.

The dataset's trainer settings (crop, schedule, batch, evaluation) are
segjax.config.base_config("voc"); this file states the model and what
it changes.

Paper's figure: none on VOC; the UNet 3+ paper reports medical datasets only.
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("voc")
  c.model = "unet3p"
  c.model_kwargs = ml_collections.ConfigDict(dict(depth=4, base_width=64, deep_supervision=True, cgm=False))
  c.loss.name = "unet3p_hybrid"
  c.loss.kwargs.aux_weight = 4.0
  return apply_mode(c, mode)
