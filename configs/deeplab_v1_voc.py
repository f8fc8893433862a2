"""DeepLab v1 LargeFOV (Chen et al. 2015) on PASCAL VOC 2012 aug (21 classes).

    segjax train --config configs/deeplab_v1_voc.py --workdir workdir/deeplab_v1_voc

The paper's setup: 321x321 crops, batch 20, SGD lr 1e-3, momentum 0.9,
weight decay 5e-4, 6000 steps (the paper's step decay replaced by poly). The
dense CRF (model_kwargs.crf=True, the paper's DeepLab-CRF) runs at inference
only. Initialise the convolutions from torchvision's vgg16 with `segjax
convert`.

The dataset's trainer settings (crop, schedule, batch, evaluation) are
segjax.config.base_config("voc"); this file states the model and what
it changes.
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("voc")
  c.model = "deeplab_v1"
  c.model_kwargs = ml_collections.ConfigDict(dict(crf=False))
  c.image_size = (321, 321)
  c.train.update(steps=6000, batch_size=20)
  c.optimizer.learning_rate = 1e-3
  return apply_mode(c, mode)
