"""DeepLab v3 (Chen et al. 2017) on PASCAL VOC 2012 aug (21 classes).

    segjax train --config configs/deeplab_v3_voc.py --workdir workdir/deeplab_v3_voc

ResNet-101 at output stride 16 with multi-grid (1, 2, 4) and the ASPP (1x1,
rates 6/12/18, image pooling, BN); the paper's 513x513 crops, batch 16, SGD
lr 0.007 with poly decay, 30k steps. Initialise the backbone from
torchvision's resnet101 with `segjax convert`.

The dataset's trainer settings (crop, schedule, batch, evaluation) are
segjax.config.base_config("voc"); this file states the model and what
it changes.

Paper's figure: 77.21 % val mIoU with output stride 8 at inference,
multi-scale inputs and flips, ImageNet-only initialisation (Chen et al. 2017).
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("voc")
  c.model = "deeplab_v3"
  c.model_kwargs = ml_collections.ConfigDict(dict(output_stride=16, multi_grid=(1, 2, 4)))
  c.image_size = (513, 513)
  c.train.steps = 30000
  c.optimizer.learning_rate = 0.007
  return apply_mode(c, mode)
