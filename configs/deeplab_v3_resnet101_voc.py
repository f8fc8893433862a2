"""DeepLab v3-ResNet101 (torchvision's deeplabv3_resnet101) on PASCAL VOC 2012 aug.

    segjax train --config configs/deeplab_v3_resnet101_voc.py --workdir workdir/deeplab_v3_resnet101_voc

ResNet-101 at output stride 8, ASPP rates (12, 24, 36), auxiliary FCN head
on layer3 (loss weight 0.4). Fine-tune torchvision's COCO-VOC checkpoint
with `segjax convert --config configs/deeplab_v3_resnet101_voc.py --weights
deeplabv3_resnet101_coco.pth --output init/` and --config.init_from=init/.

The dataset's trainer settings (crop, schedule, batch, evaluation) are
segjax.config.base_config("voc"); this file states the model and what
it changes.
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("voc")
  c.model = "deeplab_v3_resnet101"
  c.model_kwargs = ml_collections.ConfigDict(dict(aux=True))
  c.loss.kwargs.aux_weight = 0.4
  return apply_mode(c, mode)
