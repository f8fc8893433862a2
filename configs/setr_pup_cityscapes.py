"""SETR-PUP (Zheng et al., CVPR 2021) on Cityscapes fine (19 classes).

    python -c "import timm, torch; torch.save(timm.create_model('vit_large_patch16_384',
        pretrained=True).state_dict(), 'vit_large_patch16_384.pth')"
    segjax convert --config configs/setr_pup_cityscapes.py --weights vit_large_patch16_384.pth \
        --output init/setr_pup_cityscapes
    segjax train --config configs/setr_pup_cityscapes.py --workdir workdir/setr_pup_cityscapes \
        --config.init_from=init/setr_pup_cityscapes

ViT-L/16 initialised from timm's vit_large_patch16_384 (SETR used the same
network's original weights, jx_vit_large_p16_384-b3be5167.pth, which convert
alike); the progressive upsampling decoder and three auxiliary heads on
layers 10/15/20 (two 3x3 convs each), as mmseg's
setr_vit-l_pup_8xb1-80k_cityscapes-768x768 and the official
SETR_PUP_768x768_80k_cityscapes_bs_8: 768x768 crops, batch 8 (8 GPUs x 1),
80k iterations, SGD momentum 0.9, lr 0.01 with poly decay (power 0.9, down
to 1e-4), weight decay 0, the heads at 10x lr, no gradient clipping;
aux_weight 3 x 0.4 = 1.2 (mmseg sums, segjax averages the auxiliary
losses). Evaluation slides 768x768 windows with stride 512.

Expected: 79.34 mIoU on val, single-scale (the official repository; mmseg's
reproduction 79.21, 81.02 multi-scale + flip).
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("cityscapes")
  c.model = "setr_pup"
  c.model_kwargs = ml_collections.ConfigDict(dict(size="large", aux=True))
  c.image_size = (768, 768)
  c.train.update(steps=80000, batch_size=8)
  c.loss.kwargs = dict(aux_weight=1.2)
  c.optimizer.update(name="sgd", learning_rate=0.01, momentum=0.9, weight_decay=0.0,
                     schedule="poly", poly_power=0.9, end_factor=0.01, warmup_steps=0,
                     grad_clip_norm=0.0)
  c.optimizer.lr_mult = dict(decode_head=10.0, auxiliary_head=10.0)
  c.eval.update(mode="slide", crop_size=(768, 768), stride=(512, 512),
                every_steps=8000)
  c.checkpoint.every_steps = 8000
  return apply_mode(c, mode)
