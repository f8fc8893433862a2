"""Faster R-CNN ResNet-50-FPN on COCO 2017: the 1x schedule.

    segjax convert --model faster_rcnn_r50_fpn --num_classes 81 \
        --weights resnet50-0676ba61.pth --output init/r50_coco
    segjax train --config configs/faster_rcnn_r50_fpn_coco.py \
        --workdir workdir/faster_rcnn_coco --config.init_from=init/r50_coco

configs/mask_rcnn_r50_fpn_coco.py without the mask branch: torchvision's
fasterrcnn_resnet50_fpn and Detectron's 1x recipe (the same as Mask
R-CNN's): an ImageNet-initialised ResNet-50 with frozen BatchNorm and
conv1 + layer1 frozen (3 trainable stages), images resized to 800 on the
short side and at most 1333 on the long one with random horizontal flips,
512 sampled ROIs and 2000 proposals per image in training, 90k steps of
batch 16 with SGD (lr 0.02, momentum 0.9, weight decay 1e-4, 1000 warmup
steps, x0.1 at 60k and 80k). Evaluation: COCO box AP on val2017 with
pycocotools.

Static shapes as in mask_rcnn_r50_fpn_coco.py: landscape and square
images on an 800 x 1344 canvas, portrait ones on 1344 x 800
(instances.group_by_aspect), with up to 100 instances; the train step
compiles once per canvas. The input pipeline still makes the instance
masks (the same batches as Mask R-CNN's); they stay on the host, since no
loss reads them.

The dataset is coco_instances (segjax.data.builders.coco); num_classes is
81 (80 contiguous classes + background), where torchvision's COCO
checkpoints use the 91 COCO ids.
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("coco")
  c.model = "faster_rcnn_r50_fpn"
  c.model_kwargs = ml_collections.ConfigDict(dict(frozen_bn=True,
                                                  trainable_backbone_layers=3))
  c.instances = ml_collections.ConfigDict(dict(
      max_instances=100, min_size=(800,), max_size=1333, canvas=(),
      size_divisibility=32, flip=True, drop_crowd=True, group_by_aspect=True))
  c.optimizer.grad_clip_norm = 0.0  # Detectron clips nothing.
  return apply_mode(c, mode)
