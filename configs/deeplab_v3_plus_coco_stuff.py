"""DeepLab v3+ (Chen et al. 2018) on COCO-Stuff 164k (171 classes).

    segjax train --config configs/deeplab_v3_plus_coco_stuff.py --workdir workdir/dlv3p_stuff
    segjax eval --workdir workdir/dlv3p_stuff

ResNet-101 at output stride 8 (no multi-grid) with the ASPP and the
stride-4 decoder; 512x512 crops, batch 16, SGD lr 0.01 with poly decay over
80k steps, weight decay 5e-4: mmsegmentation's COCO-Stuff 164k recipe.
Evaluation: each whole image at its own size, single scale.
Initialise the backbone from torchvision's resnet101 with `segjax convert`.

The dataset's trainer settings are segjax.config.base_config("coco_stuff").
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("coco_stuff")
  c.model = "deeplab_v3_plus"
  c.model_kwargs = ml_collections.ConfigDict(dict(output_stride=8, multi_grid=None))
  return apply_mode(c, mode)
