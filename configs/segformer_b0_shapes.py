"""SegFormer-B0 on the built-in segjax_shapes dataset: CPU-sized.

    segjax train --config configs/segformer_b0_shapes.py --workdir workdir/segformer_b0_shapes

The paper's smallest model as it is (MiT-B0 encoder, widths 32..256, two
blocks per stage; decoder width 256; 3.7M params), trained from scratch on
the family's half-resolution setting (base_config("segjax_shapes")): 64x64
crops of the 128x128 images scaled by 0.4-0.6, evaluated at 64x64 and scored
against the full-size labels; 1500 AdamW steps of batch 16 with a cosine
schedule. AdamW at 1e-3 rather than the family's 3e-3, as for the SETR
shapes config: transformers trained without pretraining are less stable at
high rates. The decoder keeps the base rate (the paper's 10x decoder rate
is for a pretrained encoder). `get_config("tiny")` is a seconds-long smoke
run. For the paper's setting see segformer_b*_ade20k.py / _cityscapes.py.
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("segjax_shapes")
  c.model = "segformer_b0"
  c.model_kwargs = ml_collections.ConfigDict(dict(drop_path_rate=0.1))
  c.optimizer.learning_rate = 1e-3
  return apply_mode(c, mode)
