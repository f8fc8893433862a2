"""DeconvNet (Noh et al. 2015) on PASCAL VOC 2012 aug (21 classes).

    segjax train --config configs/deconvnet_voc.py --workdir workdir/deconvnet_voc

VGG16-BN + fc6 (7x7) / fc7 and the mirrored deconvolution network with max
unpooling by the pooling switches; initialise the encoder from torchvision's
vgg16_bn with `segjax convert`.

The dataset's trainer settings (crop, schedule, batch, evaluation) are
segjax.config.base_config("voc"); this file states the model and what
it changes.
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("voc")
  c.model = "deconvnet"
  c.model_kwargs = ml_collections.ConfigDict()
  return apply_mode(c, mode)
