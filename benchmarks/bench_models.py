"""Every registered model: parameters, GFLOPs, train-step and inference throughput.

    python benchmarks/bench_models.py                          # 512x512, batch 8, all models
    python benchmarks/bench_models.py --models fcn8s,segnet --size 256 --batch 2 --runs 3
    python benchmarks/bench_models.py --dtype bfloat16 --out bench_models.json

For each model (paper defaults, `num_classes` 21): parameter count, GFLOPs of
one inference and of one SGD train step (XLA cost analysis of the compiled
program), compile seconds, median inference and train-step time over --runs
runs after a warm-up (block_until_ready), images/s, peak memory and, on an
accelerator with a known peak, MFU of the train step. Where a PyTorch original
exists (TORCH_ORIGINALS: torchvision's fcn_resnet50 / deeplabv3_resnet50,
Hugging Face's SegformerForSemanticSegmentation for segformer_b*) and its
library is importable, it is timed in the same run and the ratio printed.
--flops-only skips the timing (what XLA counts needs only compilation).
"""
import argparse
import ast
import json
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segjax import losses, models
from segjax.train import optim, steps
from segjax.train.state import init_state

from timing import compile_jax, fmt, median_time, peak_flops, peak_memory_mb


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


def bench_model(spec, args):
  """One row: the model's size, FLOPs and timings."""
  name, options = parse_spec(spec)
  model = models.build(name, args.classes, dtype=getattr(jnp, args.dtype), **options)
  opt = ml_collections.ConfigDict(dict(
      name="sgd", learning_rate=0.01, schedule="constant", warmup_steps=0,
      weight_decay=0.0, momentum=0.9, grad_clip_norm=0.0))
  tx, schedule = optim.make_optimizer(opt, 1000)
  shape = (args.size, args.size, 3)
  state = jax.jit(init_state, static_argnums=(0, 1, 3))(model, tx, jax.random.PRNGKey(0),
                                                          shape)
  params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(state.params))
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(args.batch, *shape)).astype(np.float32)),
           "label": jnp.asarray(rng.integers(0, args.classes, (args.batch, args.size,
                                                                args.size)).astype(np.int32))}
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  infer = lambda v, x: model.apply(v, x, train=False)["logits"]
  infer_c, infer_compile, infer_gflops = compile_jax(infer, variables, batch["image"])
  train = lambda s, b, k: steps.train_step(s, b, k, model=model, tx=tx, schedule=schedule,
                                           loss_fn=losses.make_loss("cross_entropy"))
  key = jax.random.PRNGKey(1)
  train_c, train_compile, train_gflops = compile_jax(train, state, batch, key)
  row = dict(model=spec, params_m=params / 1e6, infer_gflops=infer_gflops,
             train_gflops=train_gflops, compile_s=infer_compile + train_compile)
  if args.flops_only:
    return row
  infer_s = median_time(lambda: jax.block_until_ready(infer_c(variables, batch["image"])),
                        args.runs, args.warmup)
  holder = {"state": state}

  def train_once():
    holder["state"], m = train_c(holder["state"], batch, key)
    jax.block_until_ready(m["loss"])

  train_s = median_time(train_once, args.runs, args.warmup)
  peak = peak_flops(jax.devices()[0], args.dtype)
  row.update(infer_images_per_sec=args.batch / infer_s, train_images_per_sec=args.batch / train_s,
             train_step_s=train_s, peak_memory_mb=peak_memory_mb()[0],
             mfu=train_gflops * 1e9 / train_s / peak if peak else None)
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
  try:
    import torch
    net, logits_of = TORCH_ORIGINALS[name](name, args)
  except ImportError:
    return None
  gpu = torch.cuda.is_available()
  device = torch.device("cuda" if gpu else "cpu")
  net = net.to(device).to(memory_format=torch.channels_last).train()
  opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
  image = torch.randn(args.batch, 3, args.size, args.size, device=device).to(
      memory_format=torch.channels_last)
  label = torch.randint(0, args.classes, (args.batch, args.size, args.size), device=device)
  dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
      logits = logits_of(net(image), (args.size, args.size))
      loss = torch.nn.functional.cross_entropy(logits.float(), label)
    loss.backward()
    opt.step()
    if gpu:
      torch.cuda.synchronize()

  return median_time(step, args.runs, max(args.warmup, 1))  # cuDNN autotuning


COLUMNS = ("model", "params_m", "infer_gflops", "train_gflops", "compile_s",
           "infer_images_per_sec", "train_images_per_sec", "peak_memory_mb", "mfu",
           "torch_ratio")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default=",".join(models.available()),
                      # name:key=value sets a model option, e.g. setr_pup:size=base
                      help="comma-separated registry names (default: all)")
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--classes", type=int, default=21)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--runs", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=1,
                      help="untimed runs first (XLA programs are compiled before)")
  parser.add_argument("--flops-only", action="store_true")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--out", help="write the rows as JSON here")
  args = parser.parse_args(argv)
  print(f"{args.size}x{args.size}, batch {args.batch}, {args.dtype}, {args.classes} classes, "
        f"median of {args.runs} after {args.warmup} warm-up, {jax.devices()[0].device_kind}")
  print(" | ".join(COLUMNS), flush=True)
  rows = []
  for name in args.models.split(","):
    row = bench_model(name, args)
    rows.append(row)
    print(" | ".join(fmt(row.get(k)) for k in COLUMNS), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(args=vars(args), device=jax.devices()[0].device_kind, rows=rows), f,
                indent=1)
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
