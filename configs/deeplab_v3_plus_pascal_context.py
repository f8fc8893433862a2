"""DeepLab v3+ (Chen et al. 2018) on PASCAL-Context (59 classes).

    segjax train --config configs/deeplab_v3_plus_pascal_context.py --workdir workdir/dlv3p_context
    segjax eval --workdir workdir/dlv3p_context   # 480x480 windows every 320 px

ResNet-101 at output stride 8 (no multi-grid) with the ASPP and the
stride-4 decoder; 480x480 crops, batch 16, SGD lr 0.004 with poly decay
over 40k steps, weight decay 1e-4: mmsegmentation's Context-59 recipe,
evaluated with 480x480 sliding windows at stride 320 over the full images.
Initialise the backbone from torchvision's resnet101 with `segjax convert`.

The dataset's trainer settings are segjax.config.base_config("pascal_context").
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("pascal_context")
  c.model = "deeplab_v3_plus"
  c.model_kwargs = ml_collections.ConfigDict(dict(output_stride=8, multi_grid=None))
  c.eval.update(mode="slide", crop_size=(480, 480), stride=(320, 320))
  return apply_mode(c, mode)
