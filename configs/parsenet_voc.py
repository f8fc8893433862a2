"""ParseNet (Liu et al. 2015) on PASCAL VOC 2012 aug (21 classes).

    segjax train --config configs/parsenet_voc.py --workdir workdir/parsenet_voc

The DeepLab-LargeFOV VGG16 trunk with global context (global average
pooling, L2 normalisation with a learned per-channel scale initialised to
10, unpooling by broadcast, concatenation).

The dataset's trainer settings (crop, schedule, batch, evaluation) are
segjax.config.base_config("voc"); this file states the model and what
it changes.
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("voc")
  c.model = "parsenet"
  c.model_kwargs = ml_collections.ConfigDict()
  return apply_mode(c, mode)
