"""Faster R-CNN (ResNet-FPN) on segjax_shapes: the CPU-sized schedule.

    segjax train --config configs/faster_rcnn_shapes.py --workdir workdir/faster_rcnn_shapes

configs/mask_rcnn_shapes.py without the mask branch (Ren et al. 2015's
detector with the FPN of Lin et al. 2017, torchvision's
fasterrcnn_resnet50_fpn made small): the same backbone, anchors, proposal
and ROI counts, data and schedule, so the two runs differ only by the mask
head and its loss:

- backbone: a ResNet-FPN with a 16-wide stem, one bottleneck per stage and
  64 FPN channels (ResNet-50-FPN: 64 wide, 3-4-6-3 blocks, 256 channels);
  BatchNorm trains (nothing to freeze from scratch);
- box head: a 256-wide MLP (1024);
- anchors 16-256 px, one size per level P2-P6 (32-512 in the paper), for
  128 x 128 images with 10-60 px objects;
- fewer proposals (1000 per level before NMS, 256 after in training, 100 in
  evaluation) and 128 sampled ROIs per image instead of 512;
- 1000 steps of batch 8 (4 epochs of the 2000 training images), AdamW 2e-3
  with 100 warmup steps and a cosine decay.

The images stay at their 128 x 128 (min_size = max_size = canvas = 128).
Evaluation is COCO box AP on the 200 validation images
(segjax/tasks/instance.py), every 250 steps. Measured on a 2-core CPU
(shared with other work): box AP 0.776, box AP50 0.980 in 9 min 49 s,
compilation and evaluations included (the dataset already generated);
mask_rcnn_shapes.py, with the mask head besides, reaches box AP 0.744.
`get_config("tiny")` is a seconds-long smoke run.
"""
import ml_collections

from segjax.config import apply_mode, base_config


def get_config(mode=""):
  c = base_config("segjax_shapes")
  c.model = "faster_rcnn_r50_fpn"
  c.num_classes = 4  # background + circle, rectangle, triangle
  c.image_size = (128, 128)  # the canvas (config.instances.canvas)
  c.model_kwargs = ml_collections.ConfigDict(dict(
      stage_sizes=(1, 1, 1, 1), width=16, fpn_channels=64, representation_size=256,
      frozen_bn=False, trainable_backbone_layers=5,
      anchor_sizes=((16,), (32,), (64,), (128,), (256,)),
      rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=256,
      rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=100,
      box_batch_size_per_image=128, box_detections_per_img=100))
  c.instances = ml_collections.ConfigDict(dict(
      max_instances=8, min_size=(128,), max_size=128, canvas=(128, 128),
      size_divisibility=32, flip=True, drop_crowd=True))
  c.train.update(steps=1000, batch_size=8, log_every_steps=25)
  c.optimizer.update(name="adamw", learning_rate=2e-3, schedule="cosine",
                     warmup_steps=100, weight_decay=1e-4, grad_clip_norm=10.0)
  c.eval.update(every_steps=250, batch_size=20)
  c.checkpoint.every_steps = 500
  return apply_mode(c, mode)
