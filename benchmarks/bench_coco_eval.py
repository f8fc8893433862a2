"""Host memory and time of COCO evaluation over a val2017-sized split.

    python benchmarks/bench_coco_eval.py [--images 5000] [--detections 100] [--json out.json]

What process 0 does with a detector's output in `segjax train` / `segjax
eval` (segjax/tasks/instance.py), on synthetic data of COCO's sizes: for
each image as it arrives, `detections.to_original` scales its D boxes and
pastes its D 28x28 mask probabilities at the stored size (640x480,
480x640 or 640x427, as most of val2017), and `CocoEvaluator.add_detections`
encodes them to RLE at once; the pasted masks of one image are all that
is ever held (D x H x W bools, 31 MB at D = 100). Ground truth (7
instances per image, COCO's mean) is added the same way. Then
`CocoEvaluator.summary` runs pycocotools for boxes and masks.

Printed: seconds and peak RSS after the images are accumulated and after
pycocotools, and the bytes held per detection. For scale: holding every
pasted mask of 5,000 images x 100 detections at 640x480 would take 154 GB.
"""
import argparse
import resource
import time

import numpy as np

import timing
from segjax import coco_eval, detections
from segjax.data import instances

SIZES = ((480, 640), (640, 480), (427, 640))  # (H, W) as stored
MIN_SIZE, MAX_SIZE = 800, 1333
M = 28  # the FPN mask head's resolution


def _peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _resized(h, w):
  """The resized image's (h, w) on the detector's canvas for a stored (h, w)."""
  canvas = (MAX_SIZE, MAX_SIZE)  # never the bound: 800 / 1333 decide
  return tuple(int(v) for v in instances.resized_size((h, w), MIN_SIZE, MAX_SIZE, canvas))


def _random_boxes(rng, n, h, w):
  """[n, 4] (x1, y1, x2, y2) of 8 px to half the image per side."""
  bw, bh = rng.uniform(8, w / 2, n), rng.uniform(8, h / 2, n)
  x1, y1 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
  return np.stack([x1, y1, x1 + bw, y1 + bh], 1).astype(np.float32)


def _ground_truth(rng, evaluator, image_id, h, w, instances, num_classes):
  boxes = _random_boxes(rng, instances, h, w)
  masks = np.zeros((instances, h, w), np.uint8)
  for mask, (x1, y1, x2, y2) in zip(masks, boxes.astype(int)):
    mask[y1:y2, x1:x2] = 1
  evaluator.add_ground_truth(image_id, h, w, boxes, rng.integers(1, num_classes, instances),
                             masks, None)


def _detections(rng, d, h, w, num_classes):
  """One image's detector output in the canvas frame, as detect_step gives it."""
  v, u = np.meshgrid(np.linspace(-1, 1, M), np.linspace(-1, 1, M), indexing="ij")
  blob = np.clip(1.3 - np.hypot(u, v), 0, 1).astype(np.float32)
  return {"boxes": _random_boxes(rng, d, h, w),
          "scores": np.sort(rng.uniform(0.05, 1, d)).astype(np.float32)[::-1].copy(),
          "classes": rng.integers(1, num_classes, d).astype(np.int32),
          "valid": np.ones(d, bool),
          "mask_probs": np.clip(blob + rng.normal(0, 0.2, (d, M, M)), 0, 1).astype(np.float32)}


def run(images, d, instances=7, num_classes=81, seed=0):
  rng = np.random.default_rng(seed)
  evaluator = coco_eval.CocoEvaluator(num_classes)
  start = time.perf_counter()
  for image_id in range(images):
    h, w = SIZES[image_id % len(SIZES)]
    _ground_truth(rng, evaluator, image_id, h, w, instances, num_classes)
    canvas = _resized(h, w)
    dets = detections.to_original(_detections(rng, d, *canvas, num_classes), canvas, (h, w))
    evaluator.add_detections(image_id, dets["boxes"], dets["scores"], dets["classes"],
                             dets["masks"])
    if image_id % 500 == 499:
      print(f"  {image_id + 1} images, {time.perf_counter() - start:.0f} s, "
            f"peak RSS {_peak_rss_gb():.2f} GB", flush=True)
  accumulated = time.perf_counter() - start
  rss_accumulated = _peak_rss_gb()
  start = time.perf_counter()
  summary = evaluator.summary()
  return {"images": images, "detections_per_image": d,
          "num_detections": summary["num_detections"],
          "seconds_accumulate": round(accumulated, 1),
          "peak_rss_gb_accumulated": round(rss_accumulated, 2),
          "seconds_pycocotools": round(time.perf_counter() - start, 1),
          "peak_rss_gb": round(_peak_rss_gb(), 2),
          "mask_ap": summary["mask_ap"], "box_ap": summary["box_ap"]}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=5000)
  parser.add_argument("--detections", type=int, default=100)
  parser.add_argument("--json", help="write the row here")
  args = parser.parse_args(argv)
  base = _peak_rss_gb()
  row = run(args.images, args.detections)
  row["peak_rss_gb_at_start"] = round(base, 2)
  print(f"{row['images']} images x {row['detections_per_image']} detections: "
        f"accumulated in {row['seconds_accumulate']} s (peak RSS "
        f"{row['peak_rss_gb_accumulated']} GB), pycocotools {row['seconds_pycocotools']} s "
        f"(peak RSS {row['peak_rss_gb']} GB; {row['peak_rss_gb_at_start']} GB at start)")
  timing.write_rows(args.json, args, [row])
  return row


if __name__ == "__main__":
  main()
