"""SETR-MLA (Zheng et al., CVPR 2021) on ADE20K (150 classes).

    python -c "import timm, torch; torch.save(timm.create_model('vit_large_patch16_384',
        pretrained=True).state_dict(), 'vit_large_patch16_384.pth')"
    segjax convert --config configs/setr_mla_ade20k.py --weights vit_large_patch16_384.pth \
        --output init/setr_mla_ade20k
    segjax train --config configs/setr_mla_ade20k.py --workdir workdir/setr_mla_ade20k \
        --config.init_from=init/setr_mla_ade20k

ViT-L/16 initialised from timm's vit_large_patch16_384 (SETR used the same
network's original weights, jx_vit_large_p16_384-b3be5167.pth, which convert
alike; MLA runs without the class token, so its token and position row are
dropped); `segjax convert` fills the encoder, the neck and heads start fresh.
Multi-level aggregation of layers 6/12/18/24 and four auxiliary 1x1
classifiers on the neck's outputs, as mmseg's
setr_vit-l_mla_8xb2-160k_ade20k-512x512 and the official config: 512x512
crops, batch 16 (8 GPUs x 2), 160k iterations, SGD momentum 0.9, lr 0.001
with poly decay (power 0.9, down to 1e-4), weight decay 0, the heads at 10x
lr (mmseg's 'head' key: the neck stays at 1x), no gradient clipping. mmseg
sums the auxiliary losses with weight 0.4 each; segjax's aux_weight
multiplies their mean, hence 4 x 0.4 = 1.6. Evaluation slides 512x512
windows with stride 341.

Expected: 48.64 mIoU single-scale, 50.28 multi-scale + flip (the official
repository's ADE20K table, batch 16, with the paper's 3x3 classifier; mmseg's
reproduction, 1x1 classifier, 47.54 / 49.37).
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("ade20k")
  c.model = "setr_mla"
  c.model_kwargs = ml_collections.ConfigDict(dict(size="large", aux=True))
  c.loss.kwargs = dict(aux_weight=1.6)
  c.optimizer.update(name="sgd", learning_rate=0.001, momentum=0.9, weight_decay=0.0,
                     schedule="poly", poly_power=0.9, end_factor=0.1, warmup_steps=0,
                     grad_clip_norm=0.0)
  c.optimizer.lr_mult = dict(decode_head=10.0, auxiliary_head=10.0)
  c.eval.update(mode="slide", crop_size=(512, 512), stride=(341, 341))
  return apply_mode(c, mode)
