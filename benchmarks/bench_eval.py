"""Data-parallel evaluation time (segjax/evaluation.py) on a VOC-sized split.

    python benchmarks/bench_eval.py [--images 1449] [--devices 1 8] [--json out.json]

Images of 500x375 and 375x500 (VOC's two most common sizes), random pixels
and labels, scored with the paper protocol of ADE20K/Cityscapes configs:
sliding 512x512 windows every 341 pixels, scales 0.75/1.0/1.25, flips; the
model is the shapes U-Net (width 16, depth 4) unless --width/--depth say
otherwise. For each device count it first scores 16 images (compiling both
canvases), then prints the wall time of one pass over the whole split,
images/s, and how many images each device scored. On a CPU the
"devices" share the same cores (XLA_FLAGS' forced host devices), so the
figure to read there is the even share, not a speed-up.
"""
import argparse
import json
import os
import sys
import time

# Forced CPU devices must be set before jax is imported.
_DEVICES = max([int(a) for a in sys.argv if a.isdigit()] + [8])
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={_DEVICES}")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from segjax import evaluation, inference, models  # noqa: E402


def _examples(count, smoke, seed=0):
  """`count` examples cycling through 16 distinct ones (held once in memory)."""
  rng = np.random.default_rng(seed)
  big, small = ((375, 500), (500, 375)) if not smoke else ((40, 70), (70, 40))
  pool = []
  for i in range(16):
    h, w = big if i % 3 else small
    pool.append((rng.normal(size=(h, w, 3)).astype(np.float32),
                 rng.integers(0, 21, (h, w)).astype(np.int32)))
  return [(f"{i:04d}", *pool[i % 16]) for i in range(count)]


def run(images, num_devices, width, depth, smoke=False):
  model = models.build("unet", num_classes=21, base_width=width, depth=depth,
                       padding="same")
  crop = (64, 64) if smoke else (512, 512)
  stride = (43, 43) if smoke else (341, 341)
  options = inference.InferenceOptions(mode="slide", crop_size=crop, stride=stride,
                                       scales=(0.75, 1.0, 1.25), flip=True)
  variables = jax.jit(model.init, static_argnames="train")(
      jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.float32), train=False)
  scorer = evaluation.ShardedScorer(inference.Segmenter(model, options), 21,
                                    jax.devices()[:num_devices])
  replicated = scorer.replicate(variables)
  examples = _examples(images, smoke)
  # One pass over a few images of each size compiles every canvas; the split
  # is then timed once (at VOC size one pass is half an hour on this CPU).
  start = time.perf_counter()
  warmup = scorer(replicated, examples[:16])
  compile_seconds = time.perf_counter() - start
  before = scorer.images_per_device.copy()
  start = time.perf_counter()
  matrix = scorer(replicated, examples)
  seconds = time.perf_counter() - start
  per_device = (scorer.images_per_device - before).tolist()
  assert sum(per_device) == images, per_device
  assert warmup.sum() <= matrix.sum()
  return {"images": images, "devices": num_devices,
          "seconds_warmup_16_images": round(compile_seconds, 2),
          "seconds": round(seconds, 2), "images_per_sec": round(images / seconds, 2),
          "compilations": scorer.segmenter.compilations,
          "images_per_device": per_device,
          "matrix_checksum": int((matrix * np.arange(1, matrix.size + 1).reshape(
              matrix.shape)).sum()),
          "pixels": int(matrix.sum())}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=1449)
  parser.add_argument("--devices", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--width", type=int, default=16)
  parser.add_argument("--depth", type=int, default=4)
  parser.add_argument("--smoke", action="store_true", help="toy sizes (the test suite)")
  parser.add_argument("--json", help="write the rows here")
  args = parser.parse_args(argv)
  rows = []
  for n in args.devices:
    rows.append(run(args.images, n, args.width, args.depth, args.smoke))
    print(f"{n} device(s): {rows[-1]['seconds']} s for {args.images} images", flush=True)
  print(f"{'devices':>7} {'images':>6} {'warm-up s':>9} {'s':>8} {'img/s':>7}  images per device")
  for r in rows:
    print(f"{r['devices']:>7} {r['images']:>6} {r['seconds_warmup_16_images']:>9} "
          f"{r['seconds']:>8} {r['images_per_sec']:>7}  {r['images_per_device']}")
  if len({(r["pixels"], r["matrix_checksum"]) for r in rows}) != 1:
    raise SystemExit("device counts disagree on the confusion matrix")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)
  return rows


if __name__ == "__main__":
  main()
