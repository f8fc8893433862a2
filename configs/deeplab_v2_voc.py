"""DeepLab v2 (Chen et al. 2017) on PASCAL VOC 2012 aug (21 classes).

    segjax train --config configs/deeplab_v2_voc.py --workdir workdir/deeplab_v2_voc

ResNet-101 at output stride 8 with ASPP-L (rates 6, 12, 18, 24, summed) and
the paper's schedule: 321x321 crops, batch 10, SGD lr 2.5e-4 with poly decay
(power 0.9), 20k steps; the dense CRF (model_kwargs.crf=True) at inference.
Initialise the backbone from torchvision's resnet101 with `segjax convert`.

The dataset's trainer settings (crop, schedule, batch, evaluation) are
segjax.config.base_config("voc"); this file states the model and what
it changes.
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("voc")
  c.model = "deeplab_v2"
  c.model_kwargs = ml_collections.ConfigDict(dict(crf=False))
  c.image_size = (321, 321)
  c.train.update(steps=20000, batch_size=10)
  c.optimizer.learning_rate = 2.5e-4
  return apply_mode(c, mode)
