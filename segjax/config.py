"""Experiment configs: load a `configs/*.py` file, apply overrides, validate.

A config file defines `get_config()` returning an `ml_collections.ConfigDict`
(big_vision style: plain Python, no inheritance chains). Overrides come from
the command line as `--config.train.steps=100`; each must name a key that
exists, and its value is parsed to that key's type.
"""
import ast
import difflib
import importlib.util
import json
import os

import ml_collections

from segjax.errors import ConfigError

# Keys every trainer config has (docs/design.md, "Configs"). Missing ones are
# reported at once.
REQUIRED_KEYS = (
    "seed", "model", "model_kwargs", "dataset", "data_dir", "num_classes",
    "image_size", "train.steps", "train.batch_size", "train.log_every_steps",
    "optimizer.name", "optimizer.learning_rate", "optimizer.schedule",
    "optimizer.warmup_steps", "optimizer.weight_decay", "optimizer.momentum",
    "eval.every_steps", "eval.batch_size", "eval.split",
    "checkpoint.every_steps", "checkpoint.keep", "parallel.mode", "dtype",
    "init_from",
)


# Dicts of options that their builders validate (models.build, losses.get_loss),
# so an override may add a key to them: --config.model_kwargs.output_stride=8.
OPEN_KEYS = ("model_kwargs", "loss.kwargs", "optimizer.lr_mult")


# Sizes whose None means "not set" (the image's own size, whole-image
# inference): an override may clear them, e.g. --config.eval.resize_to=None.
NULLABLE_KEYS = ("eval.resize_to", "eval.crop_size", "eval.stride")


def load_config(path, overrides=()):
  """Loads `path` (a configs/*.py file or a workdir's config.json).

  Args:
    path: file path; `.py` files must define `get_config()`, optionally
      taking one string argument given as `path:arg`.
    overrides: iterable of "a.b=value" strings.

  Returns:
    A validated, unlocked `ml_collections.ConfigDict`.
  """
  path, _, arg = str(path).partition(":")
  if not os.path.isfile(path):
    raise ConfigError(
        f"config file {path!r} does not exist; pass --config with the path of "
        "a file in configs/, e.g. --config configs/unet_shapes.py")
  if path.endswith(".json"):
    with open(path) as f:
      try:
        config = ml_collections.ConfigDict(json.load(f))
      except json.JSONDecodeError as e:
        raise ConfigError(f"config {path!r} is not valid JSON ({e}); fix or "
                          "delete it and pass --config configs/<file>.py") from e
  else:
    config = _load_py(path, arg)
  apply_overrides(config, overrides)
  validate(config)
  return config


def _load_py(path, arg):
  spec = importlib.util.spec_from_file_location("segjax_user_config", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # The user's file: report it as theirs, not ours.
    raise ConfigError(f"config file {path!r} failed to load: "
                      f"{type(e).__name__}: {e}") from e
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} defines no get_config(); add "
                      "`def get_config(): ...` returning a ConfigDict")
  config = module.get_config(arg) if arg else module.get_config()
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"get_config() in {path!r} returned "
                      f"{type(config).__name__}, not an ml_collections.ConfigDict")
  return config


def apply_overrides(config, overrides):
  """Sets `a.b=value` overrides in place; unknown keys raise ConfigError."""
  for item in overrides:
    key, sep, text = item.partition("=")
    key = key.strip().removeprefix("--").removeprefix("config.")
    if not sep:
      raise ConfigError(f"override {item!r} has no value; write it as "
                        f"--config.{key}=VALUE")
    head, _, name = key.rpartition(".")
    if head in OPEN_KEYS:
      holder, field = _parent(config, head)
      if name not in holder[field]:
        # A new option: the model / loss builder checks its name and value.
        holder[field][name] = _parse(text, None, key)
        continue
    parent, name = _parent(config, key)
    old = parent[name]
    parent[name] = _parse(text, old, key)


def _parent(config, key):
  """Returns (dict holding the last part of `key`, last part)."""
  parts = key.split(".")
  node = config
  for depth, part in enumerate(parts):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      here = ".".join(parts[:depth]) or "the config"
      options = list(node.keys()) if hasattr(node, "keys") else []
      close = difflib.get_close_matches(part, options, n=3)
      hint = (f"; did you mean {', '.join(close)}?" if close else
              f"; keys of {here}: {', '.join(sorted(options))}" if options else "")
      raise ConfigError(f"config key {key!r} does not exist{hint}")
    if depth < len(parts) - 1:
      node = node[part]
  return node, parts[-1]


def _parse(text, old, key):
  """Parses `text` to the type of the value it replaces."""
  if isinstance(old, str):
    return text
  if isinstance(old, bool) and text.lower() in ("true", "false"):
    return text.lower() == "true"  # as shell flags are usually written
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if old is None:  # A None default accepts a plain string (e.g. a path).
      return text
    raise ConfigError(f"cannot parse --config.{key}={text!r}; give a Python "
                      f"literal of type {type(old).__name__}") from None
  if old is None or isinstance(value, type(old)):
    return value
  if value is None and key in NULLABLE_KEYS:
    return None
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if isinstance(old, (tuple, list)) and isinstance(value, (tuple, list)):
    return type(old)(value)
  raise ConfigError(f"--config.{key}={text!r} has type {type(value).__name__}, "
                    f"but {key} expects {type(old).__name__}")


def validate(config):
  """Checks the keys and values every trainer config needs."""
  missing = []
  for key in REQUIRED_KEYS:
    try:
      _parent(config, key)
    except ConfigError:
      missing.append(key)
  if missing:
    raise ConfigError(f"config is missing required keys: {', '.join(missing)}")
  _check(config.num_classes >= 1, "num_classes must be >= 1")
  _check(config.train.steps >= 0, "train.steps must be >= 0")
  _check(config.train.batch_size >= 1, "train.batch_size must be >= 1")
  _check(config.parallel.mode in ("jit", "pmap"),
         f"parallel.mode is {config.parallel.mode!r}; use 'jit' or 'pmap'")
  _check(config.dtype in ("float32", "bfloat16", "float16"),
         f"dtype is {config.dtype!r}; use 'float32' or 'bfloat16'")
  _check(config.optimizer.name in ("sgd", "adamw", "adam"),
         f"optimizer.name is {config.optimizer.name!r}; use 'sgd', 'adamw' or 'adam'")
  _check(config.optimizer.schedule in ("constant", "poly", "cosine", "step"),
         f"optimizer.schedule is {config.optimizer.schedule!r}; use 'constant', "
         "'poly', 'cosine' or 'step'")
  policy = option(config.train, "train", "nan_policy")
  _check(policy in ("stop", "skip"),
         f"train.nan_policy is {policy!r}; use 'stop' or 'skip'")
  _check(option(config.train, "train", "max_nonfinite_steps") >= 0,
         "train.max_nonfinite_steps must be >= 0")
  for key in ("eval.every_steps", "checkpoint.every_steps", "train.log_every_steps"):
    parent, name = _parent(config, key)
    _check(parent[name] >= 1, f"{key} must be >= 1")


def _check(ok, message):
  if not ok:
    raise ConfigError(message)


def to_json(config):
  """The resolved config as JSON text (written to <workdir>/config.json)."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


# The trainer settings of each dataset family, which every model's config on
# that data starts from. One level only: a config file states its model and
# whatever it changes, and `base_config` is the one other place to read.
# Scale jitter and ImageNet normalisation, for ImageNet-initialised backbones.
_IMAGENET_AUGMENT = dict(scale_range=(0.5, 2.0), mean=(123.675, 116.28, 103.53),
                         std=(58.395, 57.12, 57.375))
_DATASETS = {
    # The 2-core CPU budget: half-resolution training, scored at full size.
    "segjax_shapes": dict(
        dataset="segjax_shapes", num_classes=4, image_size=(64, 64),
        augment=dict(scale_range=(0.4, 0.6), mean=(127.5,) * 3, std=(64.0,) * 3),
        train=dict(steps=1500, batch_size=16, log_every_steps=50),
        optimizer=dict(name="adamw", learning_rate=3e-3, schedule="cosine",
                       warmup_steps=50, weight_decay=1e-4),
        eval=dict(every_steps=500, batch_size=50, resize_to=(64, 64)),
        checkpoint=dict(every_steps=500)),
    # PASCAL VOC 2012 + SBD (train_aug): 512x512 crops, batch 16, SGD with a
    # poly schedule over 40k steps (the common benchmark schedule), ImageNet
    # normalisation for ImageNet-initialised backbones.
    "voc": dict(
        dataset="voc2012_segmentation/aug", num_classes=21, image_size=(512, 512),
        augment=_IMAGENET_AUGMENT,
        train=dict(steps=40000, batch_size=16, log_every_steps=50),
        optimizer=dict(name="sgd", learning_rate=0.01, schedule="poly", warmup_steps=0,
                       weight_decay=5e-4),
        eval=dict(every_steps=4000, batch_size=8, resize_to=None),
        checkpoint=dict(every_steps=4000)),
    # PASCAL-Context (59 classes, background ignored): 480x480 crops, batch
    # 16, SGD lr 0.004 with poly decay over 40k steps, weight decay 1e-4
    # (mmsegmentation's Context-59 schedule).
    "pascal_context": dict(
        dataset="pascal_context/59", num_classes=59, image_size=(480, 480),
        augment=_IMAGENET_AUGMENT,
        train=dict(steps=40000, batch_size=16, log_every_steps=50),
        optimizer=dict(name="sgd", learning_rate=0.004, schedule="poly", warmup_steps=0,
                       weight_decay=1e-4),
        eval=dict(every_steps=4000, batch_size=8, resize_to=None),
        checkpoint=dict(every_steps=4000)),
    # COCO-Stuff 164k (171 classes): 512x512 crops, batch 16, SGD lr 0.01 with
    # poly decay over 80k steps, weight decay 5e-4 (mmsegmentation's schedule).
    "coco_stuff": dict(
        dataset="coco_instances/stuff", num_classes=171, image_size=(512, 512),
        augment=_IMAGENET_AUGMENT,
        train=dict(steps=80000, batch_size=16, log_every_steps=50),
        optimizer=dict(name="sgd", learning_rate=0.01, schedule="poly", warmup_steps=0,
                       weight_decay=5e-4),
        eval=dict(every_steps=8000, batch_size=8, resize_to=None),
        checkpoint=dict(every_steps=8000)),
    # ADE20K (SceneParsing, 150 classes, reduce-zero-label): 512x512 crops,
    # batch 16, 160k steps, the schedule of SegFormer and SETR.
    "ade20k": dict(
        dataset="ade20k", num_classes=150, image_size=(512, 512),
        augment=_IMAGENET_AUGMENT,
        train=dict(steps=160000, batch_size=16, log_every_steps=50),
        optimizer=dict(name="adamw", learning_rate=6e-5, schedule="poly", warmup_steps=1500,
                       weight_decay=0.01),
        eval=dict(every_steps=16000, batch_size=8, resize_to=None),
        checkpoint=dict(every_steps=16000)),
    # Cityscapes fine (19 train ids): 1024x1024 crops, batch 8, 160k steps.
    "cityscapes": dict(
        dataset="cityscapes", num_classes=19, image_size=(1024, 1024),
        augment=_IMAGENET_AUGMENT,
        train=dict(steps=160000, batch_size=8, log_every_steps=50),
        optimizer=dict(name="adamw", learning_rate=6e-5, schedule="poly", warmup_steps=1500,
                       weight_decay=0.01),
        eval=dict(every_steps=16000, batch_size=2, resize_to=None),
        checkpoint=dict(every_steps=16000)),
    # COCO 2017 instances (80 classes + background) for Mask / Faster R-CNN: the
    # paper's 1x schedule, 90k steps of batch 16, SGD 0.02 divided by 10 at
    # 60k and 80k, 1000 warmup steps; images resized to 800 (short) / 1333
    # (long), on 800 x 1344 or 1344 x 800 canvases by orientation
    # (config.instances).
    "coco": dict(
        dataset="coco_instances/instances", num_classes=81, image_size=(1344, 1344),
        augment=dict(scale_range=(1.0, 1.0), mean=(123.675, 116.28, 103.53),
                     std=(58.395, 57.12, 57.375)),
        train=dict(steps=90000, batch_size=16, log_every_steps=20),
        optimizer=dict(name="sgd", learning_rate=0.02, schedule="step", warmup_steps=1000,
                       weight_decay=1e-4, milestones=(60000, 80000)),
        eval=dict(every_steps=10000, batch_size=8, resize_to=None),
        checkpoint=dict(every_steps=5000)),
}


# The options every family shares, with their defaults: base_config declares
# them, and code that also takes a hand-built section (make_optimizer, the
# input pipeline) falls back on these through `option`, never on a default of
# its own.
DEFAULTS = {
    "data": dict(
        # Shards the training split is read in (0: one per process). A fixed
        # number makes the batch sequence the same on any number of hosts.
        num_shards=0, shuffle_buffer=2048, prefetch=2,
        # Training splits of at most this many examples are decoded once and
        # cached in memory.
        cache_below=4096,
        # Preparing a downloaded or folder dataset: leave out (and count)
        # corrupt or inconsistent examples instead of stopping at the first.
        skip_bad_examples=False),
    "train": dict(nan_policy="stop", max_nonfinite_steps=10),
    "optimizer": dict(
        momentum=0.9, grad_clip_norm=1.0, end_factor=0.01, poly_power=0.9,
        lr_mult={},  # {top-level module: learning-rate factor}, e.g. a head's 10x
        milestones=(), decay_factor=0.1),  # schedule="step"
    # `segjax eval` / `segjax predict` inference (segjax/inference.py):
    # "whole" or "slide" (crop_size, stride), at `scales` with optional
    # flips, on canvases rounded up to a multiple of `bucket` pixels.
    "eval": dict(mode="whole", crop_size=None, stride=None, scales=(1.0,), flip=False,
                 bucket=32),
}


def option(section, name: str, key: str):
  """`section[key]` of the config block `name` ("data", "optimizer", ...), or
  its default in DEFAULTS where a hand-built block leaves it out."""
  return section.get(key, DEFAULTS[name][key])


def base_config(family: str = "segjax_shapes") -> ml_collections.ConfigDict:
  """Every core key, set for a dataset family: "segjax_shapes", "voc",
  "pascal_context", "ade20k", "cityscapes", "coco" or "coco_stuff".

  The model keys (`model`, `model_kwargs`) are left for the config file,
  which ends with `return apply_mode(c, mode)`.
  """
  if family not in _DATASETS:
    raise ConfigError(f"unknown dataset family {family!r}; use one of "
                      f"{', '.join(sorted(_DATASETS))}")
  d = _DATASETS[family]
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ""
  c.model_kwargs = ml_collections.ConfigDict()
  c.dataset = d["dataset"]
  c.data_dir = None  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets.
  c.num_classes = d["num_classes"]
  c.image_size = d["image_size"]  # Training crop (H, W).
  c.augment = ml_collections.ConfigDict(dict(flip=True, photometric=True, **d["augment"]))
  c.data = ml_collections.ConfigDict(dict(DEFAULTS["data"]))
  c.loss = ml_collections.ConfigDict(dict(name="cross_entropy", kwargs={}))
  c.train = ml_collections.ConfigDict({**DEFAULTS["train"], **d["train"]})
  c.optimizer = ml_collections.ConfigDict({**DEFAULTS["optimizer"], **d["optimizer"]})
  c.eval = ml_collections.ConfigDict(dict(
      split="validation",
      # Evaluation (in training and `segjax eval`) and `segjax predict`
      # (segjax/inference.py): "whole" or "slide" (crop_size, stride), at
      # `scales` with optional flips, each image on a canvas rounded up to a
      # multiple of `bucket` pixels; batch_size images per call over all
      # devices (segjax/evaluation.py).
      **DEFAULTS["eval"],
      **d["eval"]))  # resize_to: run the model at this size (None: image size).
  c.checkpoint = ml_collections.ConfigDict(dict(keep=3, **d["checkpoint"]))
  c.parallel = ml_collections.ConfigDict(dict(mode="jit"))
  c.dtype = "float32"
  c.init_from = None
  return c


# Tiny mode (`configs/<x>.py:tiny`): each model at the smallest widths and
# depths that keep its structure, so a tiny run compiles and trains in
# seconds on a CPU. Only sizes are named here: the options the experiment
# chose (output stride, FCN alignment, auxiliary heads, deep supervision,
# CRF) stay as they are. Multi-grid needs one rate per block of the last
# stage, so it goes with the blocks.
_TINY_VGG = dict(widths=(8,) * 5, stage_sizes=(1,) * 5, fc_width=16)
_TINY_RESNET = dict(stage_sizes=(1, 1, 1, 1), width=8)
_TINY_SEGFORMER = dict(hidden_sizes=(8, 16, 16, 16), depths=(1, 1, 1, 1),
                       num_heads=(1, 2, 2, 2), decoder_width=16)
_TINY_SETR = dict(width=32, depth=4, num_heads=2, pretrain_grid=(2, 2), channels=8)
# Mask / Faster R-CNN from scratch (see apply_mode): BatchNorm trained,
# every stage trained, few proposals and rois.
_TINY_DETECTOR = dict(
    stage_sizes=(1, 1, 1, 1), width=16, fpn_channels=64, representation_size=256,
    frozen_bn=False, trainable_backbone_layers=5,
    anchor_sizes=((16,), (32,), (64,), (128,), (256,)),
    rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=32,
    rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=16,
    box_batch_size_per_image=32, box_detections_per_img=10)
TINY_MODEL_KWARGS = {
    "unet": dict(base_width=4, depth=2),
    "unet_pp": dict(base_width=4, depth=2),
    "unet3p": dict(base_width=4, depth=2),
    "fcn_resnet50": _TINY_RESNET, "fcn_resnet101": _TINY_RESNET,
    "deeplab_v3_resnet50": _TINY_RESNET, "deeplab_v3_resnet101": _TINY_RESNET,
    "fcn32s": _TINY_VGG, "fcn16s": _TINY_VGG, "fcn8s": _TINY_VGG,
    "deconvnet": _TINY_VGG, "deeplab_v1": _TINY_VGG, "parsenet": _TINY_VGG,
    "segnet": dict(widths=(8,) * 5, stage_sizes=(1,) * 5),
    "deeplab_v2": _TINY_RESNET,
    "deeplab_v3": dict(_TINY_RESNET, multi_grid=None, aspp_channels=16),
    "deeplab_v3_plus": dict(_TINY_RESNET, multi_grid=None, aspp_channels=16,
                            low_level_channels=8, decoder_channels=16),
    **{f"segformer_b{i}": _TINY_SEGFORMER for i in range(6)},
    "setr_naive": _TINY_SETR, "setr_pup": _TINY_SETR,
    "setr_mla": dict(_TINY_SETR, mla_head_channels=8),
    "mask_rcnn_r50_fpn": dict(_TINY_DETECTOR, mask_channels=64),
    "faster_rcnn_r50_fpn": _TINY_DETECTOR,
}
TINY_SIDE = 32  # training crop of semantic models (detectors: 64, see _tiny)
TINY_STEPS = 4


def apply_mode(c: ml_collections.ConfigDict, mode: str = "") -> ml_collections.ConfigDict:
  """`c` as is (mode ""), or shrunk to a seconds-long smoke run (mode "tiny").

  Config files pass their `get_config(mode)` argument here last, so "tiny"
  overrides whatever the experiment set (`--config configs/x.py:tiny`).

  Tiny keeps the experiment's recipe and its evaluation protocol and shrinks
  their sizes: the model (`TINY_MODEL_KWARGS`), the training crop (32; for
  detectors a 64 canvas, or 32 x 64 and 64 x 32 ones where the experiment
  groups by orientation), steps (4) and batch (8); the evaluation's
  `resize_to`, sliding-window `crop_size` and `stride` scale with the crop,
  so slide windows, scales and flips still run, on small windows. Schedule
  milestones scale with the steps (the warmup is cut to the run by the
  schedule itself). The learning rate stays the experiment's: the tiny
  runs of every family finish with finite losses at it (tests/e2e).
  """
  if mode == "tiny":
    _tiny(c)
  elif mode:
    raise ConfigError(f"unknown config mode {mode!r}; the only mode is 'tiny'")
  return c


def _tiny(c):
  detector = "instances" in c
  side = 2 * TINY_SIDE if detector else TINY_SIDE
  factor = side / max(c.image_size)

  def scaled(size):
    return None if size is None else tuple(max(1, round(v * factor)) for v in size)

  c.model_kwargs.update(TINY_MODEL_KWARGS.get(c.model, {}))
  c.image_size = (side, side)
  c.augment.scale_range = (0.5, 1.0)
  c.eval.update(resize_to=scaled(c.eval.resize_to), crop_size=scaled(c.eval.crop_size),
                stride=scaled(c.eval.stride), every_steps=TINY_STEPS, batch_size=8)
  steps = c.train.steps
  c.train.update(steps=TINY_STEPS, batch_size=8, log_every_steps=2)
  c.checkpoint.every_steps = 2
  # The schedule shortens the warmup to the run (segjax.train.optim); the
  # milestones keep their place in the run, after that warmup.
  if c.optimizer.get("milestones"):
    warmup = min(c.optimizer.warmup_steps, TINY_STEPS - 1)
    c.optimizer.milestones = tuple(sorted({
        min(max(warmup + 1, round(m * TINY_STEPS / steps)), TINY_STEPS)
        for m in c.optimizer.milestones}))
  if detector and c.instances.get("group_by_aspect"):
    # Both orientation canvases, 32 x 64 and 64 x 32, as the recipe's.
    c.instances.update(canvas=(), min_size=(side // 2,), max_size=side,
                       max_instances=8)
  elif detector:
    c.instances.update(canvas=(side, side), min_size=(side,), max_size=side,
                       max_instances=8)
