"""Input throughput: images/s per CPU core of the real tf.data training streams.

    python benchmarks/bench_input.py --out bench_input.json     # 4 families x 1, 2 cores
    python benchmarks/bench_input.py --families cityscapes --cores 1 --batches 10
    python benchmarks/bench_input.py --smoke                    # seconds: tiny files

For each dataset family this writes synthetic files in the real download's
formats, sizes and folder layout (VOC: 500x375 JPEGs and palette PNGs;
Cityscapes: 2048x1024 RGB PNGs and label-id PNGs; ADE20K: 683x512 JPEGs
and PNG annotations; COCO: 640x480 JPEGs with 7 polygon instances each in
instances_train2017.json), prepares the tfds dataset from them with
segjax's own builder, and reads the training stream a config file trains
from (segjax.data.pipeline.train_batches; segjax.data.instances'
for Mask R-CNN): decode, augment at the paper's crop, batch, the Mask R-CNN
targets included. Images: smooth colour fields with pixel noise, so that
they compress about as photographs do; labels: blocks of classes.

Each measurement runs in a fresh process pinned to N cores
(os.sched_setaffinity, which tf.data's thread pools size themselves by),
times --batches batches after --warmup, and reports images/s and images/s
per core, and images per CPU second the process used (the rate of one
fully busy core, which on a shared machine is steadier than the wall-clock
rate). Two ways of reading are measured: "decode" (every epoch decodes
the files again: what VOC aug, ADE20K and COCO do, their training splits
being above data.cache_below = 4096 examples) and "cached" (decoded
examples cached in memory, Cityscapes' 2975-image split under the
default): the stream then costs augmentation only.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# family -> config file, dataset it is read as, (H, W) of the stored images
FAMILIES = {
    "voc": dict(config="configs/deeplab_v3_resnet101_voc.py",
                dataset="voc2012_segmentation", image=(375, 500)),
    "cityscapes": dict(config="configs/segformer_b5_cityscapes.py",
                       dataset="cityscapes", image=(1024, 2048)),
    "ade20k": dict(config="configs/segformer_b0_ade20k.py", dataset="ade20k",
                   image=(512, 683)),
    "coco": dict(config="configs/mask_rcnn_r50_fpn_coco.py",
                 dataset="coco_instances/instances", image=(480, 640)),
}
INSTANCES_PER_IMAGE = 7


# --- synthetic downloads ------------------------------------------------------
def photo(rng, h, w):
  """uint8 [h, w, 3]: a smooth random colour field with pixel noise."""
  from PIL import Image
  coarse = rng.uniform(0, 255, (h // 32 + 2, w // 32 + 2, 3)).astype(np.uint8)
  smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
  return np.clip(smooth + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)


def regions(rng, h, w, ids):
  """uint8 [h, w]: 64-pixel blocks of values drawn from `ids`."""
  coarse = rng.choice(np.asarray(ids, np.uint8), (h // 64 + 1, w // 64 + 1))
  return np.repeat(np.repeat(coarse, 64, 0), 64, 1)[:h, :w]


def _save(path, array, **kwargs):
  from PIL import Image
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, **kwargs)


def _save_palette(path, ids):
  from PIL import Image
  from segjax import viz
  image = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.tobytes())
  image.putpalette(viz.palette(256).ravel().tolist())
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path)


def write_voc(root, n, hw, rng):
  voc = os.path.join(root, "VOCdevkit", "VOC2012")
  names = {"train": [f"2007_{i:06d}" for i in range(n)], "val": ["2008_000000"]}
  for split, ids in names.items():
    for name in ids:
      _save(os.path.join(voc, "JPEGImages", f"{name}.jpg"), photo(rng, *hw), quality=90)
      _save_palette(os.path.join(voc, "SegmentationClass", f"{name}.png"),
                    regions(rng, *hw, list(range(21)) + [255]))
    lists = os.path.join(voc, "ImageSets", "Segmentation")
    os.makedirs(lists, exist_ok=True)
    with open(os.path.join(lists, f"{split}.txt"), "w") as f:
      f.write("".join(f"{name}\n" for name in ids))


def write_cityscapes(root, n, hw, rng):
  for split, count in (("train", n), ("val", 1), ("test", 1)):
    for i in range(count):
      stem = f"aachen_{i:06d}_000019"
      _save(os.path.join(root, "leftImg8bit", split, "aachen", f"{stem}_leftImg8bit.png"),
            photo(rng, *hw))
      _save(os.path.join(root, "gtFine", split, "aachen", f"{stem}_gtFine_labelIds.png"),
            regions(rng, *hw, range(34)))


def write_ade20k(root, n, hw, rng):
  top = os.path.join(root, "ADEChallengeData2016")
  for split, prefix, count in (("training", "train", n), ("validation", "val", 1)):
    for i in range(count):
      stem = f"ADE_{prefix}_{i + 1:08d}"
      _save(os.path.join(top, "images", split, f"{stem}.jpg"), photo(rng, *hw), quality=90)
      _save(os.path.join(top, "annotations", split, f"{stem}.png"),
            regions(rng, *hw, range(151)))


def write_coco(root, n, hw, rng):
  from segjax.data.builders import coco
  h, w = hw
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  ann_id = 0
  for split, folder, count in (("train", "train2017", n), ("val", "val2017", 1)):
    images, annotations = [], []
    for i in range(count):
      image_id = 1 + i + (0 if split == "train" else n)
      name = f"{image_id:012d}.jpg"
      _save(os.path.join(root, folder, name), photo(rng, h, w), quality=90)
      images.append(dict(id=image_id, file_name=name, height=h, width=w))
      for _ in range(INSTANCES_PER_IMAGE):  # 16-gons inside random boxes
        bw, bh = rng.uniform(20, w / 2), rng.uniform(20, h / 2)
        x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        xs, ys = x0 + bw / 2 * (1 + np.cos(t)), y0 + bh / 2 * (1 + np.sin(t))
        ann_id += 1
        annotations.append(dict(
            id=ann_id, image_id=image_id, iscrowd=0, area=float(bw * bh),
            category_id=int(rng.choice(coco.CATEGORY_IDS)), bbox=[x0, y0, bw, bh],
            segmentation=[np.stack([xs, ys], 1).ravel().round(2).tolist()]))
    with open(os.path.join(root, "annotations", f"instances_{folder}.json"), "w") as f:
      json.dump(dict(images=images, annotations=annotations,
                     categories=[dict(id=i, name=c) for i, c in coco.CATEGORIES]), f)


WRITERS = dict(voc=write_voc, cityscapes=write_cityscapes, ade20k=write_ade20k,
               coco=write_coco)


def prepare(family, root, n, scale):
  """Writes the family's manual download under root/manual/<family> and
  prepares its tfds dataset in root/tfds; returns the tfds data_dir."""
  from segjax.data.builders import load_builder
  spec = FAMILIES[family]
  hw = tuple(max(int(s * scale), 16) for s in spec["image"])
  manual = os.path.join(root, "manual", family)
  data_dir = os.path.join(root, "tfds")
  if not os.path.isdir(manual):
    WRITERS[family](manual, n, hw, np.random.default_rng(0))
  load_builder(spec["dataset"], data_dir, manual_dir=manual)
  return data_dir


# --- measuring ------------------------------------------------------------------
def family_config(family, data_dir, batch, cached, scale):
  """The family's training config, reading the prepared synthetic dataset."""
  from segjax import config as config_lib
  spec = FAMILIES[family]
  c = config_lib.load_config(os.path.join(REPO, spec["config"]))
  c.dataset = spec["dataset"]
  c.data_dir = data_dir
  c.train.batch_size = batch
  c.data.num_shards = 1
  c.data.cache_below = 1 << 30 if cached else 0
  if scale != 1:  # --smoke: crops (and the detector's canvas) shrink with the files
    c.image_size = tuple(max(int(s * scale) // 32 * 32, 32) for s in c.image_size)
    if "instances" in c:
      c.instances.update(canvas=c.image_size, min_size=(min(c.image_size),),
                         max_size=max(c.image_size), max_instances=8)
  return c


def measure(family, data_dir, cores, batch, batches, warmup, cached, scale):
  """{images_per_sec, images_per_cpu_s, first_batch_s} of the family's
  training stream in this process, which must already be pinned to `cores`
  cores. images_per_cpu_s counts the CPU seconds the process used (all its
  threads) while the timed batches were made: on a busy machine, where the
  wall-clock rate depends on what else runs, it is the rate of one core
  kept busy."""
  from segjax.data import instances, pipeline
  config = family_config(family, data_dir, batch, cached, scale)
  stream = (instances if family == "coco" else pipeline).train_batches(
      config, process_index=0, process_count=1)
  start = time.perf_counter()
  next(stream)
  first = time.perf_counter() - start
  for _ in range(warmup):
    next(stream)
  start, cpu = time.perf_counter(), _cpu_seconds()
  for _ in range(batches):
    out = next(stream)
  seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
  assert out["image"].shape[0] == batch
  return dict(images_per_sec=batch * batches / seconds,
              images_per_cpu_s=batch * batches / cpu, first_batch_s=first)


def _cpu_seconds():
  """User + system CPU seconds of this process, all threads."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def worker(args):
  """One measurement in this process, pinned to args.cores cores; prints JSON."""
  cores = int(args.cores)
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  print(json.dumps(measure(args.worker, args.data_dir, cores, args.batch, args.batches,
                           args.warmup, args.cached, args.scale)))


def run_one(family, data_dir, cores, cached, args):
  """A measurement in a fresh process (thread pools sized for `cores`)."""
  command = [sys.executable, os.path.abspath(__file__), "--worker", family,
             "--data-dir", data_dir, "--cores", str(cores), "--batch", str(args.batch),
             "--batches", str(args.batches), "--warmup", str(args.warmup),
             "--scale", str(args.scale)] + (["--cached"] if cached else [])
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
         "CUDA_VISIBLE_DEVICES": ""}
  out = subprocess.run(command, env=env, capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(f"{family} on {cores} core(s) failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


COLUMNS = ("family", "crop", "read", "cores", "images_per_sec", "images_per_sec_per_core",
           "images_per_cpu_s")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--families", default=",".join(FAMILIES))
  parser.add_argument("--cores", default="1,2", help="comma-separated core counts")
  parser.add_argument("--read", default="decode,cached",
                      help="decode (every epoch) and/or cached")
  parser.add_argument("--images", type=int, default=32, help="training images written")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--batches", type=int, default=12, help="timed batches")
  parser.add_argument("--warmup", type=int, default=4,
                      help="untimed batches first (cached: at least an epoch)")
  parser.add_argument("--data-dir", help="keep the synthetic files and tfds data here "
                      "(default: a temporary folder)")
  parser.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
  parser.add_argument("--smoke", action="store_true",
                      help="tiny files, 4 images, 2 batches of 2, in this process")
  parser.add_argument("--out", help="write the rows as JSON here")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--cached", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    return worker(args)
  families = args.families.split(",")
  if args.smoke:
    args.scale, args.images, args.batch, args.batches, args.warmup = 1 / 8, 4, 2, 2, 0
  with tempfile.TemporaryDirectory() as tmp:
    root = args.data_dir or tmp
    rows = []
    print(" | ".join(COLUMNS), flush=True)
    for family in families:
      data_dir = prepare(family, root, args.images, args.scale)
      crop = "x".join(str(s) for s in family_config(family, data_dir, args.batch, False,
                                                    args.scale).image_size)
      for read in args.read.split(","):
        for cores in ([1] if args.smoke else [int(c) for c in args.cores.split(",")]):
          if args.smoke:  # In this process: fast, no pinning.
            result = measure(family, data_dir, cores, args.batch, args.batches,
                             args.warmup, read == "cached", args.scale)
          else:
            result = run_one(family, data_dir, cores, read == "cached", args)
          row = dict(family=family, crop=crop, read=read, cores=cores, **result,
                     images_per_sec_per_core=result["images_per_sec"] / cores)
          rows.append(row)
          print(" | ".join(_fmt(row.get(k)) for k in COLUMNS), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(args=vars(args), rows=rows), f, indent=1)
  return rows


def _fmt(value):
  return f"{value:.4g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
  main(sys.argv[1:])
