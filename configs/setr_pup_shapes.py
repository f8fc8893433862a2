"""SETR-PUP on the built-in segjax_shapes dataset: a CPU-sized ViT.

    segjax train --config configs/setr_pup_shapes.py --workdir workdir/setr_pup_shapes

The paper's model with a ViT small enough for a 2-core CPU and trained from
scratch: width 64, 4 blocks, 4 heads, patch 16, on full-resolution 128x128
crops (an 8 x 8 token grid; the half-resolution 64x64 crops of the other
shapes configs would leave 4 x 4 tokens), the stored position grid 8 x 8;
decoder width 32 with the progressive 4 x 2x upsampling. AdamW 1e-3 with a
cosine schedule (a ViT without pretraining is less stable at the family's
3e-3), 1500 steps of batch 16. `get_config("tiny")` is a seconds-long smoke
run. For the paper's models see setr_{naive,pup,mla}_ade20k.py.
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("segjax_shapes")
  c.model = "setr_pup"
  c.model_kwargs = ml_collections.ConfigDict(dict(
      width=64, depth=4, num_heads=4, pretrain_grid=(8, 8), channels=32))
  c.image_size = (128, 128)
  c.augment.scale_range = (0.75, 1.5)
  c.eval.resize_to = None
  c.optimizer.learning_rate = 1e-3
  return apply_mode(c, mode)
