"""SegFormer-B3 (Xie et al., NeurIPS 2021) on Cityscapes fine (19 classes).

    python -c "from huggingface_hub import hf_hub_download as get; \
        print(get('nvidia/mit-b3', 'pytorch_model.bin', local_dir='mit-b3'))"
    segjax convert --config configs/segformer_b3_cityscapes.py \
        --weights mit-b3/pytorch_model.bin --output init/segformer_b3_cityscapes
    segjax train --config configs/segformer_b3_cityscapes.py \
        --workdir workdir/segformer_b3_cityscapes --config.init_from=init/segformer_b3_cityscapes

The MiT-B3 encoder initialised from Hugging Face's ImageNet-1k weights
nvidia/mit-b3; the all-MLP decoder starts fresh. The paper's schedule
(base_config("cityscapes")): 1024x1024 crops, batch 8, 160k iterations,
AdamW lr 6e-5, weight decay 0.01, 1500 warmup steps, then poly decay with
power 1.0 to 0; the decoder at 10x lr; stochastic depth 0.1; no gradient
clipping. Evaluation slides 1024x1024 windows with stride 768 over the
1024x2048 images, as the paper's.

Expected: 81.7 mIoU on val, single-scale (the paper's Table 1; mmseg's
reproduction 81.94). nvidia/segformer-b3-finetuned-cityscapes-1024-1024
converts whole the same way.
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("cityscapes")
  c.model = "segformer_b3"
  c.model_kwargs = ml_collections.ConfigDict(dict(drop_path_rate=0.1))
  c.optimizer.update(poly_power=1.0, end_factor=0.0, grad_clip_norm=0.0)
  c.optimizer.lr_mult = dict(decode_head=10.0)
  c.eval.update(mode="slide", crop_size=(1024, 1024), stride=(768, 768))
  return apply_mode(c, mode)
