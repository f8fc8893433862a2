"""FCN-ResNet101 (torchvision's fcn_resnet101) on PASCAL VOC 2012 aug (21 classes).

    segjax train --config configs/fcn_resnet101_voc.py --workdir workdir/fcn_resnet101_voc

ResNet-101 at output stride 8 with the auxiliary FCN head on layer3 (loss
weight 0.4). Start from ImageNet or torchvision's COCO-VOC weights with
`segjax convert`.

The dataset's trainer settings (crop, schedule, batch, evaluation) are
segjax.config.base_config("voc"); this file states the model and what
it changes.
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("voc")
  c.model = "fcn_resnet101"
  c.model_kwargs = ml_collections.ConfigDict(dict(aux=True))
  c.loss.kwargs.aux_weight = 0.4
  return apply_mode(c, mode)
