"""U-Net on the built-in segjax_shapes dataset: the 10-minute CPU main job.

    segjax train --config configs/unet_shapes.py --workdir workdir/unet_shapes

Sized for a 2-core CPU (dataset generation and compilation included) to reach
validation mIoU >= 0.90 within 10 minutes. To fit that budget the network
works at half resolution (segjax.config.base_config("segjax_shapes")):
training images (128x128) are scaled by 0.4-0.6 and cropped to 64x64,
evaluation images are resized to 64x64, and the logits are resized back so
that mIoU is scored against the full 128x128 labels; AdamW 3e-3, cosine, 1500
steps of batch 16. On an accelerator, train at full resolution
(image_size=(128, 128), augment.scale_range=(0.75, 1.5), eval.resize_to=None)
with the paper's base_width=64. `get_config("tiny")` is a seconds-long smoke
run.
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("segjax_shapes")
  c.model = "unet"
  c.model_kwargs = ml_collections.ConfigDict(dict(
      depth=4, base_width=16, padding="same", upsample="transpose",
      norm="batch", dropout=0.0))
  return apply_mode(c, mode)
