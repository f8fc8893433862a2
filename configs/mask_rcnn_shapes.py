"""Mask R-CNN (ResNet-FPN) on segjax_shapes instances: the CPU-sized schedule.

    segjax train --config configs/mask_rcnn_shapes.py --workdir workdir/mask_rcnn_shapes

The paper's detector, made small enough to train from scratch on a 2-core
CPU within 30 minutes, dataset generation and compilation included:

- backbone: a ResNet-FPN of the paper's shape with a 16-wide stem, one
  bottleneck per stage and 64 FPN channels (ResNet-50-FPN: 64 wide, 3-4-6-3
  blocks, 256 channels); BatchNorm trains (nothing to freeze from scratch);
- heads: 256-wide box MLP and 64-channel mask head (1024 / 256);
- anchors 16-256 px, one size per level P2-P6 (32-512 in the paper), for
  128 x 128 images with 10-60 px objects;
- fewer proposals (1000 per level before NMS, 256 after in training, 100 in
  evaluation) and 128 sampled ROIs per image instead of 512;
- 1000 steps of batch 8 (4 epochs of the 2000 training images), AdamW 2e-3
  with 100 warmup steps and a cosine decay.

The images stay at their 128 x 128 (min_size = max_size = canvas = 128).
Evaluation is COCO box and mask AP on the 200 validation images
(segjax/tasks/instance.py), every 250 steps. Measured on a 2-core CPU:
mask AP 0.763, mask AP50 0.950 (box AP 0.735) in 24 minutes, compilation
included (README, "Measured results"). `get_config("tiny")` is a
seconds-long smoke run.
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("segjax_shapes")
  c.model = "mask_rcnn_r50_fpn"
  c.num_classes = 4  # background + circle, rectangle, triangle
  c.image_size = (128, 128)  # the canvas (config.instances.canvas)
  c.model_kwargs = ml_collections.ConfigDict(dict(
      stage_sizes=(1, 1, 1, 1), width=16, fpn_channels=64, representation_size=256,
      mask_channels=64, frozen_bn=False, trainable_backbone_layers=5,
      anchor_sizes=((16,), (32,), (64,), (128,), (256,)),
      rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=256,
      rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=100,
      box_batch_size_per_image=128, box_detections_per_img=100))
  c.instances = ml_collections.ConfigDict(dict(
      max_instances=8, min_size=(128,), max_size=128, canvas=(128, 128),
      size_divisibility=32, flip=True, drop_crowd=True, group_by_aspect=False))
  c.train.update(steps=1000, batch_size=8, log_every_steps=25)
  c.optimizer.update(name="adamw", learning_rate=2e-3, schedule="cosine",
                     warmup_steps=100, weight_decay=1e-4, grad_clip_norm=10.0)
  c.eval.update(every_steps=250, batch_size=20)
  c.checkpoint.every_steps = 500
  return apply_mode(c, mode)
