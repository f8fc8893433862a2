"""Prediction files a person can look at, for image files on disk.

Both writers take a model and its variables ({"params", "batch_stats"} on
the host) and the run's config; `segjax predict` calls the one of the
model's task (segjax/tasks).
"""
import functools
import json
import os
from typing import List, Sequence

import jax
import numpy as np
import tensorflow as tf

from segjax import detections, inference, viz
from segjax.data import ground_truth, instances, normalization


def _stem(output_dir: str, path: str) -> str:
  return os.path.join(output_dir, os.path.splitext(os.path.basename(path))[0])


def semantic_files(model, variables, config, paths: Sequence[str],
                   output_dir: str) -> List[str]:
  """Writes `<name>_mask.png` (colours), `<name>_overlay.png` and
  `<name>_labels.png` (class indices) for each image file, inferred as the
  config's `eval` block says (mode, scales, flip).

  Returns:
    list of written file paths.
  """
  segmenter = inference.Segmenter(model, inference.InferenceOptions.from_config(config.eval))
  colours = viz.palette(config.num_classes)
  os.makedirs(output_dir, exist_ok=True)
  written = []
  for path in paths:
    image = inference.read_image(path)
    labels, _ = segmenter(variables, normalization.normalize(
        image, config.augment.mean, config.augment.std))
    labels = labels.astype(np.uint8)
    stem = _stem(output_dir, path)
    outputs = {f"{stem}_mask.png": viz.colorize(labels, colours),
               f"{stem}_overlay.png": viz.overlay(image, labels, colours),
               f"{stem}_labels.png": labels}
    for out_path, array in outputs.items():
      viz.save_png(out_path, array)
      written.append(out_path)
  return written


def instance_files(model, variables, config, paths: Sequence[str], output_dir: str,
                   score_thresh: float = 0.5) -> List[str]:
  """Detects objects in image files and writes what it found, per image:

    <name>_instances.png   the image with each detection's mask, box and
                           "class score" label (score >= score_thresh)
    <name>_instance_ids.png  palette PNG, pixel = 1 + index of the detection
                           it belongs to (0 none), best score on top
    <name>_detections.json  every detection above 0.05 (the model's own
                           threshold): box (x1, y1, x2, y2) pixels, score,
                           class id and name

  A detector without masks (Faster R-CNN) draws boxes and labels only and
  writes no instance-id map: no pixel belongs to a box-only detection.

  Images are resized and padded as in evaluation (config.instances: with
  group_by_aspect, on their orientation's canvas, one compilation each),
  and the detections mapped back to the file's own size.

  Returns:
    list of written file paths.
  """
  s = instances.settings(config)
  detect = jax.jit(functools.partial(model.apply, train=False, paste=False))
  names = ground_truth.class_names(config)
  os.makedirs(output_dir, exist_ok=True)
  written = []
  for path in paths:
    image = inference.read_image(path)
    ex = instances.eval_transform(
        {"image": tf.constant(image), "boxes": tf.zeros([0, 4]),
         "classes": tf.zeros([0], tf.int32), "crowd": tf.zeros([0], tf.bool)},
        s.for_size(image.shape[:2]), tuple(config.augment.mean), tuple(config.augment.std))
    image_size = ex["image_size"].numpy()
    out = jax.device_get(detect(variables, ex["image"].numpy()[None], image_size[None]))
    dets = detections.to_original({k: v[0] for k, v in out.items()}, image_size,
                                  image.shape[:2])
    stem = _stem(output_dir, path)
    masks = dets.get("masks")
    drawn = viz.draw_instances(image, dets["boxes"], dets["classes"], dets["scores"],
                               masks, names, score_thresh=score_thresh)
    viz.save_png(f"{stem}_instances.png", drawn)
    written.append(f"{stem}_instances.png")
    if masks is not None:
      ids = viz.instance_map(masks, dets["scores"], score_thresh)
      viz.save_png(f"{stem}_instance_ids.png", np.minimum(ids, 255).astype(np.uint8),
                   viz.palette(256))
      written.append(f"{stem}_instance_ids.png")
    rows = [json.dumps({"box": [round(float(v), 2) for v in box], "score": round(float(p), 4),
                        "class": int(c), "name": names[int(c)]})
            for box, p, c in zip(dets["boxes"], dets["scores"], dets["classes"])]
    with open(f"{stem}_detections.json", "w") as f:  # One detection a line.
      f.write("[\n" + ",\n".join(rows) + "\n]\n")
    written.append(f"{stem}_detections.json")
  return written
