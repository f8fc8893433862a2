"""SegNet (Badrinarayanan et al. 2017) on PASCAL VOC 2012 aug (21 classes).

    segjax train --config configs/segnet_voc.py --workdir workdir/segnet_voc

VGG16-BN encoder (13 convs) and the mirrored decoder that unpools with the
encoder's max-pooling indices; initialise the encoder from torchvision's
vgg16_bn with `segjax convert`.

The dataset's trainer settings (crop, schedule, batch, evaluation) are
segjax.config.base_config("voc"); this file states the model and what
it changes.
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("voc")
  c.model = "segnet"
  c.model_kwargs = ml_collections.ConfigDict()
  return apply_mode(c, mode)
