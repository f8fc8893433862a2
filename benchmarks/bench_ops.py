"""Benchmarks of segjax.ops: roi_align, nms, resize, dense_crf (and torchvision).

Times compiled functions after a warm-up with block_until_ready; reports the
median of --runs runs (fewer for the slow CRF case, marked in the output),
throughput, compile time, and the torchvision/PyTorch op in the same run
where importable, with the ratio (torch time / segjax time; > 1 is faster).

  python benchmarks/bench_ops.py [--quick] [--out bench_ops.json]
"""
import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

# timing first: it loads torchvision before segjax loads TensorFlow.
from timing import compile_jax, median_time
from segjax import ops
from segjax.data.builders.shapes import generate_scene

try:
  import torch
  import torchvision.ops as tvo
except ImportError:  # torch is optional
  torch = tvo = None


def timeit(fn, runs):
  return median_time(fn, runs)


def bench_jax(f, args, runs):
  compiled, compile_s, _ = compile_jax(f, *args)
  med = timeit(lambda: jax.block_until_ready(compiled(*args)), runs)
  return med, compile_s


def boxes_for(rng, k, img_h, img_w, lo=16, hi=384):
  xy = rng.uniform(0, 1, (k, 2)) * [img_w, img_h]
  wh = np.exp(rng.uniform(np.log(lo), np.log(hi), (k, 2)))
  b = np.concatenate([xy, xy + wh], 1)
  b[:, 0::2] = np.clip(b[:, 0::2], 0, img_w)
  b[:, 1::2] = np.clip(b[:, 1::2], 0, img_h)
  return b.astype(np.float32)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true", help="small sizes, few runs")
  p.add_argument("--runs", type=int, default=None)
  p.add_argument("--out", default="bench_ops.json")
  p.add_argument("--ops", default="roi,nms,resize,crf",
                 help="comma-separated sections to run: roi, nms, resize, crf")
  a = p.parse_args()
  sections = set(a.ops.split(","))
  runs = a.runs or (3 if a.quick else 20)
  rng = np.random.RandomState(0)
  rows = []
  img_h, img_w = 800, 1344  # a Mask R-CNN input: FPN maps 200x336 ... 25x42

  def add(name, work, unit, med, compile_s, ref=None, note=""):
    rows.append(dict(op=name, median_s=med, compile_s=compile_s, throughput=work / med,
                     unit=unit, torch_s=ref, ratio=(ref / med) if ref else None,
                     runs=runs, note=note))
    print(f"{name:44s} {med * 1e3:10.2f} ms  {work / med:12.1f} {unit:9s} "
          + (f"torch {ref * 1e3:9.2f} ms  ratio {ref / med:5.2f}" if ref else "") + f" {note}",
          flush=True)

  # --- roi_align ---------------------------------------------------------
  if "roi" in sections:
    k, c = (64, 64) if a.quick else (512, 256)
    feats = jnp.asarray(rng.randn(2, 200, 336, c).astype(np.float32))
    boxes = jnp.asarray(boxes_for(rng, k, img_h, img_w))
    bidx = jnp.asarray(rng.randint(0, 2, k).astype(np.int32))
    levels = [jnp.asarray(rng.randn(2, img_h // s, img_w // s, c).astype(np.float32))
              for s in (4, 8, 16, 32)]
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    ref_fwd = ref_bwd = ref_ml = None
    if tvo is not None:
      torch.set_num_threads(2)
      ft = torch.from_numpy(np.asarray(feats)).permute(0, 3, 1, 2).contiguous()
      rois = torch.from_numpy(np.concatenate([np.asarray(bidx)[:, None].astype(np.float32),
                                              np.asarray(boxes)], 1))
      ref_fwd = timeit(lambda: tvo.roi_align(ft, rois, 7, 0.25, 2), runs)
      ftg = ft.clone().requires_grad_(True)
      ref_bwd = timeit(lambda: tvo.roi_align(ftg, rois, 7, 0.25, 2).sum().backward(), runs)
      from collections import OrderedDict
      m = tvo.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
      x = OrderedDict((str(i), torch.from_numpy(np.asarray(l)).permute(0, 3, 1, 2).contiguous())
                      for i, l in enumerate(levels))
      order = np.argsort(np.asarray(bidx), kind="stable")
      bl = [torch.from_numpy(np.asarray(boxes)[order][np.asarray(bidx)[order] == i])
            for i in range(2)]
      ref_ml = timeit(lambda: m(x, bl, [(img_h, img_w)] * 2), runs)
    for impl in ("gather", "einsum"):
      fwd = lambda f, b, i, impl=impl: ops.roi_align(f, b, i, 7, 0.25, 2, impl=impl)
      add(f"roi_align fwd {impl} K={k} C={c} 200x336", k, "boxes/s",
          *bench_jax(fwd, (feats, boxes, bidx), runs), ref_fwd)
      loss = lambda f, b, i, impl=impl: jnp.sum(ops.roi_align(f, b, i, 7, 0.25, 2, impl=impl))
      add(f"roi_align fwd+bwd {impl}", k, "boxes/s",
          *bench_jax(jax.grad(loss), (feats, boxes, bidx), runs), ref_bwd)
      ml = lambda fs, b, i, impl=impl: ops.multilevel_roi_align(fs, b, i, 7, scales, 2, impl=impl)
      add(f"multilevel_roi_align fwd {impl} 4 levels", k, "boxes/s",
          *bench_jax(ml, (levels, boxes, bidx), runs), ref_ml)
      mll = lambda fs, b, i, impl=impl: jnp.sum(ops.multilevel_roi_align(fs, b, i, 7, scales, 2,
                                                                         impl=impl))
      add(f"multilevel_roi_align fwd+bwd {impl}", k, "boxes/s",
          *bench_jax(jax.grad(mll), (levels, boxes, bidx), runs))

  # --- nms -----------------------------------------------------------------
  if "nms" in sections:
    n = 5000
    nb = jnp.asarray(boxes_for(rng, n, img_h, img_w, 16, 256))
    ns = jnp.asarray(rng.rand(n).astype(np.float32))
    ref = None
    if tvo is not None:
      tb, ts = torch.from_numpy(np.asarray(nb)), torch.from_numpy(np.asarray(ns))
      ref = timeit(lambda: tvo.nms(tb, ts, 0.5), runs)
    add(f"nms N={n} iou=0.5 max_output=1000", n, "boxes/s",
        *bench_jax(lambda b, s: ops.nms(b, s, 0.5, 1000), (nb, ns), runs), ref)

  # --- resize --------------------------------------------------------------
  if "resize" in sections:
    shape = (2, 64, 64, 150) if a.quick else (8, 128, 128, 150)
    out = 256 if a.quick else 512
    x = jnp.asarray(rng.randn(*shape).astype(np.float32))
    ref = None
    if torch is not None:
      xt = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).contiguous(
          memory_format=torch.channels_last)
      ref = timeit(lambda: torch.nn.functional.interpolate(xt, size=(out, out), mode="bilinear"),
                   runs)
    for impl in ("auto", "gather", "matmul"):
      add(f"resize {shape} -> {out}x{out} {impl}", shape[0], "images/s",
          *bench_jax(lambda v, impl=impl: ops.resize(v, (out, out), impl=impl), (x,), runs), ref)
    add(f"jax.image.resize {shape} -> {out}x{out}", shape[0], "images/s",
        *bench_jax(lambda v: jax.image.resize(v, (shape[0], out, out, shape[3]), "bilinear"),
                   (x,), runs), ref)

  # --- dense CRF -------------------------------------------------------------
  if "crf" in sections:
    hw = 128 if a.quick else 512
    crf_runs = 3
    u = jnp.asarray(rng.randn(1, hw, hw, 21).astype(np.float32))
    # A segjax_shapes scene (smooth textured regions, as photos have) and
    # uniform random colours, the permutohedral lattice's worst case.
    scene = generate_scene(np.random.default_rng(0), hw)["image"]
    images = {"scene": scene, "random colours": rng.randint(0, 256, (hw, hw, 3))}
    saved, runs = runs, crf_runs
    for kind, image in images.items():
      im = jnp.asarray(image[None].astype(np.uint8))
      add(f"dense_crf fast {hw}x{hw} K=21 10 iters, {kind}", 1, "images/s",
          *bench_jax(lambda v, i: ops.dense_crf(v, i, method="fast"), (u, im), crf_runs),
          note=f"(median of {crf_runs} runs)")
      try:
        import pydensecrf.densecrf as dcrf
      except ImportError:
        continue
      un = np.array(-np.asarray(jax.nn.log_softmax(u[0], -1)).reshape(-1, 21).T, order="C")
      img = np.array(im[0], order="C")

      def ref_crf(img=img):
        d = dcrf.DenseCRF2D(hw, hw, 21)
        d.setUnaryEnergy(un)
        d.addPairwiseGaussian(sxy=3, compat=3)
        d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=img, compat=10)
        d.inference(10)
      rows[-1]["torch_s"] = t = timeit(ref_crf, crf_runs)
      rows[-1]["ratio"] = t / rows[-1]["median_s"]
      rows[-1]["note"] += " reference: pydensecrf (C++)"
      print(f"  pydensecrf {t * 1e3:.1f} ms, ratio {t / rows[-1]['median_s']:.2f}")
    runs = saved

  meta = dict(device=str(jax.devices()[0]), backend=jax.default_backend(),
              jax=jax.__version__, torch=getattr(torch, "__version__", None), quick=a.quick)
  with open(a.out, "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)
  print(f"wrote {a.out}")


if __name__ == "__main__":
  main()
