"""SegFormer-B1 (Xie et al., NeurIPS 2021) on ADE20K (150 classes).

    python -c "from huggingface_hub import hf_hub_download as get; \
        print(get('nvidia/mit-b1', 'pytorch_model.bin', local_dir='mit-b1'))"
    segjax convert --config configs/segformer_b1_ade20k.py \
        --weights mit-b1/pytorch_model.bin --output init/segformer_b1_ade20k
    segjax train --config configs/segformer_b1_ade20k.py \
        --workdir workdir/segformer_b1_ade20k --config.init_from=init/segformer_b1_ade20k

The MiT-B1 encoder (13.7M params with the decoder) initialised from
Hugging Face's ImageNet-1k weights nvidia/mit-b1 (`segjax convert` fills
params["backbone"]; the all-MLP decoder, width 256, starts fresh).
The paper's schedule (base_config("ade20k")): 512x512 crops, batch 16,
160k iterations, AdamW lr 6e-5, weight decay 0.01, 1500 warmup steps, then
poly decay with power 1.0 to 0; the decoder at 10x lr; stochastic depth 0.1;
no gradient clipping.

Expected: 42.2 mIoU single-scale (the paper's Table 1; mmseg's
reproduction 40.97). A fine-tuned whole model,
nvidia/segformer-b1-finetuned-ade-512-512, converts the same way (its
decode_head.* keys make `segjax convert` fill the decoder too).
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("ade20k")
  c.model = "segformer_b1"
  c.model_kwargs = ml_collections.ConfigDict(dict(drop_path_rate=0.1))
  c.optimizer.update(poly_power=1.0, end_factor=0.0, grad_clip_norm=0.0)
  c.optimizer.lr_mult = dict(decode_head=10.0)
  return apply_mode(c, mode)
