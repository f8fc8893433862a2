"""U-Net on the built-in segjax_shapes dataset: the 10-minute CPU main job.

    segjax train --config configs/unet_shapes.py --workdir workdir/unet_shapes

Sized for a 2-core CPU (dataset generation and compilation included) to reach
validation mIoU >= 0.90 within 10 minutes. To fit that budget the network
works at half resolution: training images (128x128) are scaled by 0.4-0.6 and
cropped to 64x64, evaluation images are resized to 64x64, and the logits are
resized back so that mIoU is scored against the full 128x128 labels. On an
accelerator, train at full resolution (image_size=(128, 128),
augment.scale_range=(0.75, 1.5), eval.resize_to=None) with the paper's
base_width=64. `get_config("tiny")` is a seconds-long smoke run.
"""
import ml_collections


def get_config(mode=""):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = "unet"
  c.model_kwargs = ml_collections.ConfigDict(dict(
      depth=4, base_width=16, padding="same", upsample="transpose",
      norm="batch", dropout=0.0))
  c.dataset = "segjax_shapes"
  c.data_dir = None  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets.
  c.num_classes = 4
  c.image_size = (64, 64)  # Training crop (H, W).

  c.augment = ml_collections.ConfigDict(dict(
      scale_range=(0.4, 0.6), flip=True, photometric=True,
      mean=(127.5, 127.5, 127.5), std=(64.0, 64.0, 64.0)))
  c.data = ml_collections.ConfigDict(dict(
      # Shards the training split is read in (0: one per process). A fixed
      # number makes the batch sequence the same on any number of hosts.
      num_shards=0, shuffle_buffer=2048, prefetch=2))

  c.loss = ml_collections.ConfigDict(dict(name="cross_entropy", kwargs={}))

  c.train = ml_collections.ConfigDict(dict(
      steps=1500, batch_size=16, log_every_steps=50, nan_policy="stop",
      max_nonfinite_steps=10))
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=3e-3, schedule="cosine", warmup_steps=50,
      weight_decay=1e-4, momentum=0.9, grad_clip_norm=1.0, end_factor=0.01,
      poly_power=0.9))
  c.eval = ml_collections.ConfigDict(dict(
      every_steps=500, batch_size=50, split="validation",
      image_size=None,  # Pad evaluation images to this size (None: as is).
      resize_to=(64, 64)))  # Run the model at this size (None: image size).
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3))
  c.parallel = ml_collections.ConfigDict(dict(mode="jit"))
  c.dtype = "float32"
  c.init_from = None

  if mode == "tiny":  # Seconds-long run for smoke tests and demos.
    c.model_kwargs.base_width = 4
    c.model_kwargs.depth = 2
    c.image_size = (32, 32)
    c.augment.scale_range = (0.5, 1.0)
    c.eval.resize_to = None
    c.train.steps = 4
    c.train.batch_size = 8
    c.train.log_every_steps = 2
    c.eval.every_steps = 4
    c.eval.batch_size = 8
    c.checkpoint.every_steps = 2
  return c
