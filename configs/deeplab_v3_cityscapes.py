"""DeepLab v3 (Chen et al. 2017) on Cityscapes fine (19 classes).

    segjax train --config configs/deeplab_v3_cityscapes.py --workdir workdir/deeplab_v3_cs
    segjax eval --workdir workdir/deeplab_v3_cs   # sliding window, MS + flip

ResNet-101, output stride 16 with multi-grid (1, 2, 4) in training, the
ASPP with image pooling and BN; 769x769 crops, batch 8, SGD lr 0.01 with
poly decay over 90k steps (the paper's Cityscapes schedule). The paper
reports 79.30 % val mIoU with output stride 8 at inference, multi-scale
inputs (0.75-2.0) and flips: --config.model_kwargs.output_stride=8 for eval.
Evaluation: 769x769 windows every 513 px over the full 2048x1024 images.
Initialise the backbone from torchvision's resnet101 with `segjax convert`.
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("cityscapes")
  c.model = "deeplab_v3"
  c.model_kwargs = ml_collections.ConfigDict(dict(output_stride=16, multi_grid=(1, 2, 4)))
  c.image_size = (769, 769)
  c.train.steps = 90000
  c.optimizer.update(name="sgd", learning_rate=0.01, weight_decay=1e-4, warmup_steps=0)
  c.eval.update(mode="slide", crop_size=(769, 769), stride=(513, 513),
                scales=(0.75, 1.0, 1.25, 1.5, 1.75, 2.0), flip=True)
  return apply_mode(c, mode)
