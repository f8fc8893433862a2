"""FCN-8s (Long et al. 2015) on PASCAL VOC 2012 aug (21 classes).

    segjax train --config configs/fcn8s_voc.py --workdir workdir/fcn8s_voc

VGG16 with fc6/fc7 as 7x7 and 1x1 convolutions, the paper's Caffe alignment
(padding 100, crop offsets), zero-initialised score layers and bilinear-
initialised upsampling. Initialise from torchvision's ImageNet vgg16
(features and classifier) with `segjax convert --config configs/fcn8s_voc.py
--weights vgg16.pth --output init/` and --config.init_from=init/.

The dataset's trainer settings (crop, schedule, batch, evaluation) are
segjax.config.base_config("voc"); this file states the model and what
it changes.

Paper's figure: 62.2 % mIoU on the VOC 2012 test set (Long et al. 2015,
Table 3); this config trains with the common 40k-step SGD benchmark schedule.
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("voc")
  c.model = "fcn8s"
  c.model_kwargs = ml_collections.ConfigDict(dict(alignment="caffe"))
  return apply_mode(c, mode)
