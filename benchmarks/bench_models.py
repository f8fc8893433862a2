"""Every registered model: parameters, GFLOPs, train-step and inference throughput.

    python benchmarks/bench_models.py                          # 512x512, batch 8, semantic models
    python benchmarks/bench_models.py --models fcn8s,segnet --size 256 --batch 2 --runs 3
    python benchmarks/bench_models.py --dtype bfloat16 --out bench_models.json

Detectors (models.task(name) == "instance", the Mask R-CNN variants) run
when named or with --detectors, at their own defaults: 800x1333 images on an
800x1344 canvas (divisible by 32), batch 2, 91 classes (COCO, background
included), 20 synthetic ground-truth instances per image:

    python benchmarks/bench_models.py --detectors --runs 3     # all four variants
    python benchmarks/bench_models.py --models mask_rcnn_r50_fpn --runs 3 --out mrcnn.json
    python benchmarks/bench_models.py --models mask_rcnn_r50_fpn --size 128,128 --batch 1 --runs 1

(--size H,W sets a detector's canvas, the images filling it; --batch and
--classes override their defaults too.)

For each model (paper defaults, `num_classes` 21): parameter count, GFLOPs of
one inference and of one SGD train step (XLA cost analysis of the compiled
program), compile seconds, median inference and train-step time over --runs
runs after a warm-up (block_until_ready), images/s, peak memory and, on an
accelerator with a known peak, MFU of the train step. h2d_mb is what one
train step's batch copies from host to device, MB (10^6 bytes), summed
over its arrays (not timed). Where a PyTorch original
exists (TORCH_ORIGINALS: torchvision's fcn_resnet50 / deeplabv3_resnet50,
Hugging Face's SegformerForSemanticSegmentation for segformer_b*) and its
library is importable, it is timed in the same run and the ratio printed.
--flops-only skips the timing (what XLA counts needs only compilation).

A detector row times the jit-compiled detector as a user calls it
(`model.apply(variables, images, image_size, paste=True)`: post-processed
detections with masks pasted into the canvas) and a train step (the five
losses of mask_rcnn.train_losses, their gradient and an SGD momentum 0.9
update of the params `mask_rcnn.trainable_mask` trains, the frozen ones
untouched: steps.train_step with tasks.instance.objective and optim.freeze, the step
`segjax train` runs, NaN/Inf guard included), compiled with the state donated.
Settings are the variants' defaults: torchvision's (2000 / 1000 proposals per
image in train / test, 256 anchors and 512 rois sampled, 100 detections; C4:
Detectron's 12000 / 6000 pre-NMS candidates), frozen BatchNorm and the top 3
ResNet stages trained. Ground truth: boxes of 16-400 pixels a side
(log-uniform, fixed seed) with box-shaped masks, random classes; the masks
go in as segjax.data.instances makes them, 112 x 112 uint8 crops with
their boxes (h2d_mb_full_masks: the batch's bytes with image-sized uint8
masks instead, as they were before). For
mask_rcnn_r50_fpn, where torchvision is importable, torchvision's
maskrcnn_resnet50_fpn is timed on the same images and targets in train (SGD
momentum step, loss sum) and eval mode: built as that function builds it for
fine-tuning (FrozenBatchNorm2d, trainable_backbone_layers=3, as segjax's
defaults; weights=None and weights_backbone=None alone would switch
torchvision to trainable BatchNorm and all five stages), no weights
downloaded, min_size / max_size set to the image size so its transform does
not rescale. torch_ratio and torch_infer_ratio are torchvision's seconds over
segjax's (> 1: segjax is faster).
"""
import argparse
import ast
import functools
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

# timing first: it loads torchvision before segjax loads TensorFlow.
from timing import compile_jax, fmt, median_time, peak_flops, peak_memory_mb, write_rows
from segjax import losses, models
from segjax.data import mask_crops
from segjax.models.detection import mask_rcnn
from segjax.tasks import instance, semantic
from segjax.train import optim, steps
from segjax.train.state import init_state


def _torchvision(builder):
  """A torchvision.models.segmentation model; its "out" is at input size."""
  def make(name, args):
    from torchvision.models import segmentation
    net = getattr(segmentation, builder)(weights=None, weights_backbone=None,
                                         num_classes=args.classes, aux_loss=False)
    return net, lambda outputs, size: outputs["out"]
  return make


def _hf_segformer(name, args):
  """transformers' SegformerForSemanticSegmentation with the registry model's
  sizes. Its logits are at 1/4 resolution; they are upsampled (bilinear,
  align_corners=False) before the loss, as segjax's model does, so both do
  the same work."""
  import torch
  import transformers
  ours = models.build(name, args.classes)
  config = transformers.SegformerConfig(
      num_labels=args.classes, hidden_sizes=list(ours.hidden_sizes),
      depths=list(ours.depths), num_attention_heads=list(ours.num_heads),
      sr_ratios=list(ours.sr_ratios), mlp_ratios=list(ours.mlp_ratios),
      patch_sizes=list(ours.patch_sizes), strides=list(ours.strides),
      decoder_hidden_size=ours.decoder_width, drop_path_rate=ours.drop_path_rate,
      classifier_dropout_prob=ours.dropout)
  net = transformers.SegformerForSemanticSegmentation(config)

  def logits(outputs, size):
    return torch.nn.functional.interpolate(outputs.logits, size=size, mode="bilinear",
                                           align_corners=False)
  return net, logits


# Registry name -> constructor (name, args) -> (PyTorch original, function
# (its outputs, (H, W)) -> logits [N, K, H, W]). Each imports its library
# when called; an ImportError skips the comparison.
TORCH_ORIGINALS = {
    "fcn_resnet50": _torchvision("fcn_resnet50"),
    "deeplab_v3_resnet50": _torchvision("deeplabv3_resnet50"),
    **{f"segformer_b{i}": _hf_segformer for i in range(6)},
}


def parse_spec(spec):
  """"setr_pup:size=base" -> ("setr_pup", {"size": "base"}): model options."""
  name, *options = spec.split(":")
  kwargs = {}
  for option in options:
    key, _, text = option.partition("=")
    try:
      kwargs[key] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      kwargs[key] = text
  return name, kwargs


def settings(task, args):
  """(canvas (H, W), image (h, w), batch, classes) of a task's rows.

  --size / --batch / --classes override the defaults: semantic models
  512x512, batch 8, 21 classes; detectors 800x1333 images on an 800x1344
  canvas, batch 2, 91 classes (background included). A given --size is the
  whole input (the canvas, which a detector's images fill).
  """
  detector = task == "instance"
  if args.size:
    canvas = tuple(int(v) for v in str(args.size).split(","))
    canvas = canvas * 2 if len(canvas) == 1 else canvas
    image = canvas
  else:
    canvas, image = ((800, 1344), (800, 1333)) if detector else ((512, 512), (512, 512))
  batch = args.batch or (2 if detector else 8)
  classes = args.classes or (91 if detector else 21)
  return canvas, image, batch, classes


def time_train_step(train_c, state, batch, key, args):
  """Median seconds of the compiled `train_c(state, batch, key) -> (state,
  {"loss", ...})`; the state is donated, so each call takes the previous
  call's output."""
  holder = {"state": state}

  def train_once():
    holder["state"], out = train_c(holder["state"], batch, key)
    jax.block_until_ready(out["loss"])

  return median_time(train_once, args.runs, args.warmup)


def throughput(n, infer_s, train_s, train_gflops, args):
  """A row's timing columns for batch n: images/s, step seconds, peak memory, MFU."""
  peak = peak_flops(jax.devices()[0], args.dtype)
  return dict(infer_images_per_sec=n / infer_s, train_images_per_sec=n / train_s,
              train_step_s=train_s, peak_memory_mb=peak_memory_mb()[0],
              mfu=train_gflops * 1e9 / train_s / peak if peak else None)


def _sgd():
  """The optimizer config every train-step row uses: SGD, momentum 0.9."""
  return ml_collections.ConfigDict(dict(
      name="sgd", learning_rate=0.01, schedule="constant", warmup_steps=0,
      weight_decay=0.0, momentum=0.9, grad_clip_norm=0.0))


def bench_model(spec, args):
  """One row: the model's size, FLOPs and timings."""
  name, options = parse_spec(spec)
  if models.task(name) == "instance":
    return bench_detector(name, options, spec, args)
  (height, width), _, n, classes = settings("semantic", args)
  model = models.build(name, classes, dtype=getattr(jnp, args.dtype), **options)
  tx, schedule = optim.make_optimizer(_sgd(), 1000)
  shape = (height, width, 3)
  state = jax.jit(init_state, static_argnums=(0, 1, 3))(model, tx, jax.random.PRNGKey(0),
                                                          shape)
  params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(state.params))
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(n, *shape)).astype(np.float32)),
           "label": jnp.asarray(rng.integers(0, classes, (n, height, width)).astype(np.int32))}
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  infer = lambda v, x: model.apply(v, x, train=False)["logits"]
  infer_c, infer_compile, infer_gflops = compile_jax(infer, variables, batch["image"])
  objective = semantic.make_objective(losses.make_loss("cross_entropy"))
  train = lambda s, b, k: steps.train_step(s, b, k, model=model, tx=tx, schedule=schedule,
                                           objective=objective)
  key = jax.random.PRNGKey(1)
  train_c, train_compile, train_gflops = compile_jax(train, state, batch, key)
  row = dict(model=spec, task="semantic", input=f"{height}x{width}", batch=n,
             params_m=params / 1e6, infer_gflops=infer_gflops,
             train_gflops=train_gflops, compile_s=infer_compile + train_compile,
             h2d_mb=h2d_mb(batch))
  if args.flops_only:
    return row
  infer_s = median_time(lambda: jax.block_until_ready(infer_c(variables, batch["image"])),
                        args.runs, args.warmup)
  train_s = time_train_step(train_c, state, batch, key, args)
  row.update(throughput(n, infer_s, train_s, train_gflops, args))
  # The PyTorch originals are built with their default options only.
  torch_s = None if options else bench_torch(name, args)
  if torch_s:
    row["torch_train_step_s"] = torch_s
    row["torch_ratio"] = torch_s / train_s
  return row


def bench_torch(name, args):
  """Train-step seconds of the PyTorch original, or None."""
  if name not in TORCH_ORIGINALS or args.no_torch:
    return None
  (height, width), _, n, classes = settings("semantic", args)
  args = argparse.Namespace(**{**vars(args), "classes": classes})
  try:
    import torch
    net, logits_of = TORCH_ORIGINALS[name](name, args)
  except ImportError:
    return None
  gpu = torch.cuda.is_available()
  device = torch.device("cuda" if gpu else "cpu")
  net = net.to(device).to(memory_format=torch.channels_last).train()
  opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
  image = torch.randn(n, 3, height, width, device=device).to(memory_format=torch.channels_last)
  label = torch.randint(0, classes, (n, height, width), device=device)
  dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
      logits = logits_of(net(image), (height, width))
      loss = torch.nn.functional.cross_entropy(logits.float(), label)
    loss.backward()
    opt.step()
    if gpu:
      torch.cuda.synchronize()

  return median_time(step, args.runs, max(args.warmup, 1))  # cuDNN autotuning


def synthetic_instances(n, canvas, image, classes, instances, seed=0):
  """A detector batch (mask_rcnn.train_losses' layout) of random data.

  Images: normal noise in each image's h x w, zeros in the canvas padding.
  Ground truth: `instances` boxes per image, sides log-uniform in 16..400
  pixels (at most the image's), uniformly placed inside the image, with
  box-shaped masks (crops all on over their boxes: "mask_crops" uint8
  [n, G, M, M], "mask_boxes" = "boxes") and classes in 1..classes-1. Numpy
  arrays, fixed seed.
  """
  rng = np.random.default_rng(seed)
  (height, width), (h, w) = canvas, image
  images = np.zeros((n, height, width, 3), np.float32)
  images[:, :h, :w] = rng.normal(size=(n, h, w, 3))
  sides = np.exp(rng.uniform(np.log(16), np.log(400), (n, instances, 2)))
  bw, bh = np.minimum(sides[..., 0], w - 1), np.minimum(sides[..., 1], h - 1)
  x1, y1 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
  boxes = np.round(np.stack([x1, y1, x1 + bw, y1 + bh], -1)).astype(np.float32)
  crop = mask_crops.MASK_CROP_SIZE
  return {"image": images, "image_size": np.tile(np.int32([h, w]), (n, 1)),
          "boxes": boxes,
          "classes": rng.integers(1, classes, (n, instances)).astype(np.int32),
          "mask_crops": np.full((n, instances, crop, crop), 255, np.uint8),
          "mask_boxes": boxes, "valid": np.ones((n, instances), bool)}


def box_masks(boxes, canvas):
  """uint8 [n, G, H, W]: 1 inside each (integer) box, the image-sized
  masks of synthetic_instances' crops."""
  masks = np.zeros(boxes.shape[:2] + tuple(canvas), np.uint8)
  for i, j in np.ndindex(boxes.shape[:2]):
    bx1, by1, bx2, by2 = boxes[i, j].astype(int)
    masks[i, j, by1:by2, bx1:bx2] = 1
  return masks


def h2d_mb(batch):
  """MB (10^6 bytes) of a batch's arrays: what a step copies to the device."""
  return sum(np.asarray(v).nbytes for v in batch.values()) / 1e6


def bench_detector(name, options, spec, args):
  """A Mask R-CNN row: detector inference (masks pasted) and a train step."""
  canvas, image, n, classes = settings("instance", args)
  model = models.build(name, classes, dtype=getattr(jnp, args.dtype), **options)
  # SGD momentum 0.9 as the semantic rows, frozen as `segjax train` freezes
  # a detector's params: no update and no momentum buffer.
  tx, schedule = optim.make_optimizer(_sgd(), 1000)
  tx = optim.freeze(tx, functools.partial(mask_rcnn.trainable_mask, model))
  # Params do not depend on the input size or the proposal / detection
  # counts: initialise on a small canvas with few boxes, which is cheap.
  small = model.clone(rpn_pre_nms_top_n_test=64, rpn_post_nms_top_n_test=16,
                      box_detections_per_img=4)
  state = jax.jit(init_state, static_argnums=(0, 1, 3))(small, tx, jax.random.PRNGKey(0),
                                                          (128, 128, 3))
  leaves = jax.tree_util.tree_leaves(state.params)
  trains = jax.tree_util.tree_leaves(mask_rcnn.trainable_mask(model, state.params))
  count = sum(int(np.prod(p.shape)) for p in leaves)
  trained = sum(int(np.prod(p.shape)) for p, t in zip(leaves, trains) if t)

  data = synthetic_instances(n, canvas, image, classes, args.instances)
  batch = {k: jnp.asarray(data[k]) for k in instance.TRAIN_KEYS}
  full_masks = n * args.instances * canvas[0] * canvas[1]  # uint8 [n, G, H, W]
  infer = lambda v, x, s: model.apply(v, x, s, train=False, paste=True)
  infer_variables = {"params": state.params, "batch_stats": state.batch_stats}
  infer_c, infer_compile, infer_gflops = compile_jax(
      infer, infer_variables, batch["image"], batch["image_size"])
  train = lambda s, b, k: steps.train_step(s, b, k, model=model, tx=tx,
                                           schedule=schedule, objective=instance.objective)
  key = jax.random.PRNGKey(1)
  train_c, train_compile, train_gflops = compile_jax(train, state, batch, key,
                                                     donate_argnums=0)
  row = dict(model=spec, task="instance",
             input=f"{image[0]}x{image[1]} in {canvas[0]}x{canvas[1]}", batch=n,
             instances=args.instances, params_m=count / 1e6, trained_params_m=trained / 1e6,
             infer_gflops=infer_gflops, train_gflops=train_gflops,
             compile_s=infer_compile + train_compile, h2d_mb=h2d_mb(batch),
             h2d_mb_full_masks=(h2d_mb(batch) - batch["mask_crops"].nbytes / 1e6
                                + full_masks / 1e6))
  if args.flops_only:
    return row
  # Inference first: the train step then owns the state (donated, so the
  # params infer_variables shares are consumed).
  infer_s = median_time(lambda: jax.block_until_ready(
      infer_c(infer_variables, batch["image"], batch["image_size"])), args.runs, args.warmup)
  # Detections above the score threshold (all D slots are computed anyway):
  # few with random weights, which torchvision's dynamic shapes profit from.
  detections = float(np.mean(np.sum(
      infer_c(infer_variables, batch["image"], batch["image_size"])["valid"], axis=1)))
  train_s = time_train_step(train_c, state, batch, key, args)
  row.update(throughput(n, infer_s, train_s, train_gflops, args), infer_s=infer_s,
             detections_per_image=detections)
  timed = None if options else bench_torch_detector(name, data, args)
  if timed:
    row.update(torch_train_step_s=timed[0], torch_infer_s=timed[1],
               torch_detections_per_image=timed[2],
               torch_ratio=timed[0] / train_s, torch_infer_ratio=timed[1] / infer_s)
  return row


def bench_torch_detector(name, data, args):
  """(train-step s, inference s, detections per image) of torchvision's Mask R-CNN, or None.

  Only mask_rcnn_r50_fpn has a torchvision original. It is what
  maskrcnn_resnet50_fpn(weights=None, weights_backbone=..., num_classes)
  builds, without the download: FrozenBatchNorm2d and the top 3 stages
  trained, as segjax's variant (weights_backbone=None would make it
  BatchNorm2d and 5 stages). Same images and targets (within the canvas
  padding, which torchvision's transform adds itself); min_size / max_size
  are the image's sides so nothing is rescaled.
  """
  if name != "mask_rcnn_r50_fpn" or args.no_torch:
    return None
  try:
    import torch
    from torchvision.models import resnet50
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import misc as misc_nn_ops
  except ImportError:
    return None
  # Core count as seen by this process (taskset), not the machine's.
  torch.set_num_threads(min(torch.get_num_threads(), len(os.sched_getaffinity(0))))
  torch.manual_seed(0)
  gpu = torch.cuda.is_available()
  device = torch.device("cuda" if gpu else "cpu")
  h, w = (int(v) for v in data["image_size"][0])
  masks = box_masks(data["boxes"], (h, w))
  backbone = resnet50(weights=None, norm_layer=misc_nn_ops.FrozenBatchNorm2d)
  backbone = _resnet_fpn_extractor(backbone, 3)
  net = MaskRCNN(backbone, num_classes=int(args.classes or 91), min_size=min(h, w),
                 max_size=max(h, w)).to(device)
  images = [torch.from_numpy(x[:h, :w]).permute(2, 0, 1).contiguous().to(device)
            for x in data["image"]]
  targets = [{"boxes": torch.from_numpy(data["boxes"][i]).to(device),
              "labels": torch.from_numpy(data["classes"][i]).long().to(device),
              "masks": torch.from_numpy(masks[i]).to(device)}
             for i in range(len(images))]
  opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.01,
                        momentum=0.9)
  sync = torch.cuda.synchronize if gpu else (lambda: None)

  def train_step():
    opt.zero_grad(set_to_none=True)
    loss = sum(net(images, targets).values())
    loss.backward()
    opt.step()
    sync()

  def infer():
    with torch.no_grad():
      out = net(images)
    sync()
    return out

  net.eval()
  infer_s = median_time(infer, args.runs, max(args.warmup, 1))
  detections = float(np.mean([len(o["boxes"]) for o in infer()]))
  net.train()
  train_s = median_time(train_step, args.runs, max(args.warmup, 1))
  return train_s, infer_s, detections


COLUMNS = ("model", "params_m", "infer_gflops", "train_gflops", "compile_s", "h2d_mb",
           "infer_images_per_sec", "train_images_per_sec", "peak_memory_mb", "mfu",
           "torch_ratio", "torch_infer_ratio")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  semantic = [m for m in models.available() if models.task(m) == "semantic"]
  detectors = [m for m in models.available() if models.task(m) == "instance"]
  parser.add_argument("--models", default=None,
                      # name:key=value sets a model option, e.g. setr_pup:size=base
                      help="comma-separated registry names, semantic or detectors "
                      "(default: every semantic model; with --detectors every detector)")
  parser.add_argument("--detectors", action="store_true",
                      help="the detectors instead of the semantic models (without --models)")
  parser.add_argument("--size", default=None,
                      help="N or H,W (default: 512 semantic; detectors 800x1333 images on "
                      "an 800x1344 canvas; given, it is the detector's canvas)")
  parser.add_argument("--batch", type=int, default=None,
                      help="default: 8 semantic, 2 detectors")
  parser.add_argument("--classes", type=int, default=None,
                      help="default: 21 semantic, 91 detectors (background included)")
  parser.add_argument("--instances", type=int, default=20,
                      help="synthetic ground-truth instances per image (detectors)")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--runs", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=1,
                      help="untimed runs first (XLA programs are compiled before)")
  parser.add_argument("--flops-only", action="store_true")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--out", help="write the rows as JSON here")
  args = parser.parse_args(argv)
  if args.models:
    names = args.models.split(",")
  else:
    names = detectors if args.detectors else semantic
  print(f"{args.dtype}, median of {args.runs} after {args.warmup} warm-up, "
        f"{jax.devices()[0].device_kind}")
  rows, shown = [], None
  for name in names:
    task = models.task(parse_spec(name)[0])
    if task != shown:
      shown = task
      canvas, image, n, classes = settings(task, args)
      inputs = (f"{image[0]}x{image[1]} images on a {canvas[0]}x{canvas[1]} canvas, "
                f"{args.instances} instances each" if task == "instance"
                else f"{canvas[0]}x{canvas[1]}")
      print(f"{task}: {inputs}, batch {n}, {classes} classes")
      print(" | ".join(COLUMNS), flush=True)
    row = bench_model(name, args)
    rows.append(row)
    print(" | ".join(fmt(row.get(k)) for k in COLUMNS), flush=True)
  write_rows(args.out, args, rows)
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
