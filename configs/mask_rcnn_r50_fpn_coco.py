"""Mask R-CNN ResNet-50-FPN on COCO 2017: the paper's 1x schedule.

    segjax convert --model mask_rcnn_r50_fpn --num_classes 81 \
        --weights resnet50-0676ba61.pth --output init/r50_coco
    segjax train --config configs/mask_rcnn_r50_fpn_coco.py --workdir workdir/mask_rcnn_coco \
        --config.init_from=init/r50_coco

As torchvision's maskrcnn_resnet50_fpn and Detectron's 1x recipe: an
ImageNet-initialised ResNet-50 with frozen BatchNorm and conv1 + layer1
frozen (3 trainable stages), images resized to 800 on the short side and at
most 1333 on the long one with random horizontal flips, 512 sampled ROIs
and 2000 proposals per image in training, 90k steps of batch 16 with SGD
(lr 0.02, momentum 0.9, weight decay 1e-4, 1000 warmup steps, x0.1 at 60k
and 80k). Evaluation: COCO box and mask AP on val2017 with pycocotools.

Static shapes: images are grouped by orientation, as Detectron's and
torchvision's samplers group them, and every batch holds one: landscape
and square images on an 800 x 1344 canvas, portrait ones on 1344 x 800
(instances.group_by_aspect; segjax.data.instances, "Canvases"), with up to
100 instances (COCO train2017 has at most 93 non-crowd ones per image).
The train step compiles once per canvas, twice in all, and so does the
evaluation step. An 800 x 1333 image fills its canvas but for 0.8 %,
where one 1344 x 1344 canvas for both orientations
(--config.instances.group_by_aspect=False) computes 1.7x its pixels;
Detectron pads each batch only to its largest image, so it computes less
still on batches of narrower images. Ground-truth masks travel as 112 x
112 crops of their boxes, 100 x 112^2 bytes per image
(segjax.data.instances).

Where the dataset comes from: segjax.data.builders.coco (coco_instances,
built from the official zip files under the tfds manual dir). The 80
classes are contiguous (label + 1 = class, 0 = background), so
num_classes is 81; torchvision's COCO checkpoints use the 91 COCO ids.
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("coco")
  c.model = "mask_rcnn_r50_fpn"
  c.model_kwargs = ml_collections.ConfigDict(dict(frozen_bn=True,
                                                  trainable_backbone_layers=3))
  c.instances = ml_collections.ConfigDict(dict(
      max_instances=100, min_size=(800,), max_size=1333, canvas=(),
      size_divisibility=32, flip=True, drop_crowd=True, group_by_aspect=True))
  c.optimizer.grad_clip_norm = 0.0  # Detectron clips nothing.
  return apply_mode(c, mode)
