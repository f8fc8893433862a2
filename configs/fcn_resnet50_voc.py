"""FCN-ResNet50 (torchvision's fcn_resnet50) on PASCAL VOC 2012 aug (21 classes).

    segjax train --config configs/fcn_resnet50_voc.py --workdir workdir/fcn_resnet50_voc

ResNet-50 at output stride 8 with the auxiliary FCN head on layer3 (loss
weight 0.4, as torchvision's reference training). Start from ImageNet
weights: `segjax convert --model fcn_resnet50 --weights resnet50.pth
--output workdir/init` and --config.init_from=workdir/init.

The dataset's trainer settings (crop, schedule, batch, evaluation) are
segjax.config.base_config("voc"); this file states the model and what
it changes.
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("voc")
  c.model = "fcn_resnet50"
  c.model_kwargs = ml_collections.ConfigDict(dict(aux=True))
  c.loss.kwargs.aux_weight = 0.4
  return apply_mode(c, mode)
