"""One short run on one GPU collects segjax's accelerator figures against PyTorch.

    python benchmarks/accelerator.py --out accelerator.json      # one GPU, <= 8 minutes
    python benchmarks/accelerator.py --smoke                      # CPU, toy sizes, seconds

Rows, each in bfloat16 and float32 (all bfloat16 rows first, so that a run
cut short by --budget-s still has the figures that matter most):

  unet                 train step, 512x512, batch 16, the paper's widths (64..1024),
                       against the same U-Net in PyTorch (AMP, channels_last,
                       torch.compile): bench_train.py's two sides
  deeplab_v3_resnet50  train step, 512x512, batch 8, against torchvision's
  fcn_resnet50         ditto
  segformer_b0/b2/b5   train step, 512x512, batch 8, against Hugging Face's
                       SegformerForSemanticSegmentation
  mask_rcnn_r50_fpn    train step and inference, 800x1333 on an 800x1344
                       canvas, batch 2, against torchvision's maskrcnn_resnet50_fpn
  roi_align            forward + backward, 512 boxes, 7x7, on a [2, 200, 336, 256]
                       map (Mask R-CNN's P2), against torchvision.ops.roi_align

(the semantic and detector rows are bench_models.py's, PyTorch side
included). Each row reports the median step time over --runs runs after a
warm-up, images/s, compile seconds, GFLOPs of the step from XLA's cost
analysis and MFU = those FLOPs / step time / the device's peak (timing.py's
PEAK_FLOPS: H100 and H200 989 TFLOP/s bfloat16, 494 TFLOP/s float32 (TF32),
dense; --peak-tflops overrides), for segjax and, with the same FLOP count,
for PyTorch; the ratio is PyTorch's time over segjax's (> 1: segjax is
faster). A row that fails is reported with its error and the run goes on;
rows that would start after --budget-s are skipped and listed as such.

Writes one JSON (--out) and a markdown table (--markdown, default: the JSON
path with .md). --smoke runs the U-Net, one registry-model row (a toy
fcn_resnet50, segjax only: the originals compare at full size) and ROI
Align at toy sizes on whatever device JAX has, so that the script cannot
rot; tests/test_benchmarks.py runs it. (The detector and SegFormer rows
share the registry row's code; their compilation alone takes minutes on a
CPU.)
"""
import argparse
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import bench_models
import bench_train
import timing
from segjax import models, ops
from timing import compile_jax, fmt, median_time, peak_flops

SEMANTIC = ("deeplab_v3_resnet50", "fcn_resnet50", "segformer_b0", "segformer_b2",
            "segformer_b5")


def unet_row(dtype, args):
  """bench_train.py's U-Net step, segjax and PyTorch in this process."""
  size, batch, width = (32, 8, 4) if args.smoke else (512, 16, 64)
  ns = argparse.Namespace(size=size, batch=batch, width=width, depth=2 if args.smoke else 4,
                          classes=21, dtype=dtype, steps=args.runs, warmup=args.warmup)
  ours = bench_train.bench_segjax(ns)
  row = dict(row="unet", input=f"{size}x{size}", batch=batch, step_s=ours["step_s"],
             images_per_sec=ours["images_per_sec"], compile_s=ours["compile_s"],
             gflops=ours["gflops_per_step"], mfu=ours["mfu"],
             peak_memory_mb=ours["peak_memory_mb"])
  theirs = None if args.no_torch else bench_train.bench_torch(ns)
  if theirs:
    row.update(torch=theirs["framework"], torch_step_s=theirs["step_s"],
               torch_peak_memory_mb=theirs["peak_memory_mb"])
  return row


def model_row(spec, dtype, args):
  """bench_models.py's row of a registry model (its PyTorch original included)."""
  name = bench_models.parse_spec(spec)[0]
  detector = models.task(name) == "instance"
  ns = argparse.Namespace(size=None, batch=None, classes=None, instances=args.instances,
                          dtype=dtype, runs=args.runs, warmup=args.warmup, flops_only=False,
                          no_torch=args.no_torch)
  if args.smoke:
    ns.size, ns.batch = ("64,64", 1) if detector else ("32", 2)
  r = bench_models.bench_model(spec, ns)
  row = dict(row=spec, input=r["input"], batch=r["batch"], step_s=r["train_step_s"],
             images_per_sec=r["train_images_per_sec"], compile_s=r["compile_s"],
             gflops=r["train_gflops"], mfu=r["mfu"], peak_memory_mb=r["peak_memory_mb"])
  if r.get("torch_train_step_s"):
    row.update(torch="torchvision" if not name.startswith("segformer") else "transformers",
               torch_step_s=r["torch_train_step_s"])
  if detector:
    row.update(infer_s=r.get("infer_s"), torch_infer_s=r.get("torch_infer_s"))
  return row


def roi_align_row(dtype, args):
  """ROI Align forward + backward (gradient w.r.t. the features)."""
  k, c, (h, w) = (16, 8, (25, 42)) if args.smoke else (512, 256, (200, 336))
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(2, h, w, c)).astype(np.float32)
  side = rng.uniform(16, 384, (k, 2))
  xy = rng.uniform(0, 1, (k, 2)) * ([w * 4, h * 4] - side)
  boxes = np.concatenate([xy, xy + side], 1).astype(np.float32)
  index = rng.integers(0, 2, k).astype(np.int32)
  jdtype = getattr(jnp, dtype)

  def loss(f, b, i):
    return jnp.sum(ops.roi_align(f.astype(jdtype), b, i, 7, 0.25, 2).astype(jnp.float32))

  args_j = (jnp.asarray(feats), jnp.asarray(boxes), jnp.asarray(index))
  compiled, compile_s, gflops = compile_jax(jax.grad(loss), *args_j)
  seconds = median_time(lambda: jax.block_until_ready(compiled(*args_j)), args.runs,
                        args.warmup)
  row = dict(row="roi_align fwd+bwd", input=f"{k} boxes, {h}x{w}x{c}", batch=k,
             step_s=seconds, images_per_sec=None, compile_s=compile_s, gflops=gflops,
             mfu=_mfu(gflops, seconds, dtype))
  if not args.no_torch:
    try:
      import torch
      import torchvision.ops as tvo
    except ImportError:
      return row
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    ft = torch.from_numpy(feats).permute(0, 3, 1, 2).contiguous().to(device, tdtype)
    ft.requires_grad_(True)
    rois = torch.from_numpy(np.concatenate([index[:, None].astype(np.float32), boxes], 1))
    rois = rois.to(device, tdtype)

    def step():
      ft.grad = None
      tvo.roi_align(ft, rois, 7, 0.25, 2).float().sum().backward()
      sync()

    row.update(torch="torchvision.ops.roi_align",
               torch_step_s=median_time(step, args.runs, max(args.warmup, 1)))
  return row


def _mfu(gflops, seconds, dtype):
  peak = peak_flops(jax.devices()[0], dtype)
  return gflops * 1e9 / seconds / peak if peak and gflops and seconds else None


def plan(args):
  """(row name, function(dtype) -> row) in the order they run, per dtype."""
  rows = [("unet", lambda d: unet_row(d, args))]
  semantic = SEMANTIC
  if args.smoke:  # Toy widths: the PyTorch originals are compared at full size only.
    # One registry row stands for all (same code path); a toy SegFormer's
    # train step alone took minutes to compile on a loaded 2-core CPU.
    semantic = ("fcn_resnet50:stage_sizes=(1,1,1,1):width=8",)
  rows += [(s, lambda d, s=s: model_row(s, d, args)) for s in semantic]
  if not args.smoke:
    rows.append(("mask_rcnn_r50_fpn", lambda d: model_row("mask_rcnn_r50_fpn", d, args)))
  rows.append(("roi_align fwd+bwd", lambda d: roi_align_row(d, args)))
  only = set(args.rows.split(",")) if args.rows else None
  return [(name, fn) for name, fn in rows if not only or name.split(":")[0] in only]


COLUMNS = ("row", "dtype", "input", "batch", "step_s", "images_per_sec", "gflops", "mfu",
           "compile_s", "torch_step_s", "torch_mfu", "torch_ratio", "peak_memory_mb", "note")


def markdown(rows, device):
  """The rows as a markdown table."""
  lines = [f"Device: {device}", "",
           "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  for row in rows:
    lines.append("| " + " | ".join(fmt(row.get(k)) for k in COLUMNS) + " |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="toy sizes, any device")
  parser.add_argument("--dtypes", default="bfloat16,float32")
  parser.add_argument("--rows", help="comma-separated subset of the row names")
  parser.add_argument("--runs", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--instances", type=int, default=7,
                      help="ground-truth instances per image (detector)")
  parser.add_argument("--budget-s", type=float, default=450,
                      help="start no row after this many seconds (one row fits the rest "
                      "of the 8 minutes)")
  parser.add_argument("--peak-tflops", type=float,
                      help="peak TFLOP/s for MFU instead of timing.PEAK_FLOPS' entry")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--out", default="accelerator.json")
  parser.add_argument("--markdown", help="default: --out with .md")
  args = parser.parse_args(argv)
  if args.smoke:
    args.runs, args.warmup = min(args.runs, 2), min(args.warmup, 1)
  if args.peak_tflops:
    timing.PEAK_OVERRIDE = args.peak_tflops * 1e12
  device = jax.devices()[0].device_kind
  start = time.perf_counter()
  rows = []
  print(f"{device}; {' | '.join(COLUMNS)}", flush=True)
  for dtype in args.dtypes.split(","):
    for name, fn in plan(args):
      if time.perf_counter() - start > args.budget_s:
        row = dict(row=name, note=f"skipped: past --budget-s {args.budget_s:g}")
      else:
        try:
          row = fn(dtype)
        except Exception as e:  # One broken row must not cost the whole GPU run.
          traceback.print_exc()
          row = dict(row=name, note=f"failed: {type(e).__name__}: {str(e)[:200]}")
      row["dtype"] = dtype
      if row.get("torch_step_s") and row.get("step_s"):
        row["torch_ratio"] = row["torch_step_s"] / row["step_s"]
        row["torch_mfu"] = _mfu(row.get("gflops"), row["torch_step_s"], dtype)
      rows.append(row)
      print(" | ".join(fmt(row.get(k)) for k in COLUMNS), flush=True)
  result = dict(device=device, smoke=args.smoke, seconds=time.perf_counter() - start,
                args=vars(args), rows=rows)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  with open(args.markdown or os.path.splitext(args.out)[0] + ".md", "w") as f:
    f.write(markdown(rows, device))
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
