"""What training and evaluating a detector adds to the loop: the inputs a
step needs, and COCO evaluation at the original resolution.

Evaluation follows torchvision's reference (references/detection): the
detector runs on the resized, padded canvas; each detection's box is scaled
back to the image as stored (`transform.postprocess`) and its M x M mask
probabilities are pasted there and thresholded at 0.5; pycocotools then
scores boxes and masks against the ground truth at that resolution, crowd
regions included. Every host runs the compiled detection step on its share;
the detections come back to every host (the step's outputs are replicated)
and process 0 reads the split's ground truth and scores.
"""
import functools
import math

import jax
import numpy as np
import tensorflow as tf

from segjax import coco_eval
from segjax.data import instances, pipeline
from segjax.errors import DataError
from segjax.models.detection import postprocess

# The keys of an instance batch the compiled steps read; the rest (crowd,
# num_dropped, int64 ids) stays on the host.
TRAIN_KEYS = ("image", "image_size", "boxes", "classes", "masks", "valid")
EVAL_KEYS = ("image", "image_size", "orig_size", "mask", "image_id")
# Original-size frames are rounded up to this many pixels per side before
# pasting, so that a dataset of many image sizes compiles a few paste shapes.
PASTE_BUCKET = 128
# Ground truth rows read per image: all of them (COCO has at most a few
# hundred, crowds included).
_ALL_INSTANCES = 100_000


def step_inputs(batch, keys):
  """The host batch's arrays the step reads (ids as int32, as jax keeps them)."""
  out = {k: batch[k] for k in keys if k in batch}
  if "image_id" in out:
    out["image_id"] = out["image_id"].astype(np.int32)
  return out


@functools.partial(jax.jit, static_argnums=(3,))
def _paste(mask_probs, boxes, valid, frame, image_size):
  return postprocess.paste_masks(mask_probs, boxes, frame, image_size, valid)


def to_original(detections, image_size, orig_size):
  """One image's detections in the canvas frame -> the stored image's frame.

  Args:
    detections: numpy "boxes" [D,4], "scores" [D], "classes" [D], "valid"
      [D], "mask_probs" [D,M,M] (segjax.train.steps.detect_step, one image).
    image_size: (h, w) of the resized image on the canvas.
    orig_size: (H, W) of the image as stored.

  Returns:
    "boxes" [n,4] float32 (x1, y1, x2, y2) in original pixels, "scores"
    [n], "classes" [n] int32 and "masks" [n,H,W] bool, for the n valid
    detections, best first.
  """
  (h, w), (big_h, big_w) = (int(x) for x in image_size), (int(x) for x in orig_size)
  scale = np.array([big_w / w, big_h / h, big_w / w, big_h / h], np.float32)
  boxes = detections["boxes"].astype(np.float32) * scale
  frame = tuple(math.ceil(x / PASTE_BUCKET) * PASTE_BUCKET for x in (big_h, big_w))
  masks = np.asarray(_paste(detections["mask_probs"], boxes, detections["valid"], frame,
                            np.array([big_h, big_w], np.int32)))
  keep = np.asarray(detections["valid"], bool)
  return {"boxes": boxes[keep], "scores": detections["scores"][keep],
          "classes": detections["classes"][keep].astype(np.int32),
          "masks": masks[keep, :big_h, :big_w]}


def ground_truth(config, split):
  """Yields each image of the split at its stored size, crowds included.

  Yields:
    dict: "image_id" int, "height", "width", "boxes" [G,4] float32,
    "classes" [G] int32 (label + 1), "masks" [G,H,W] uint8, "crowd" [G] bool.
  """
  builder = pipeline._builder(config)
  ds = builder.as_dataset(split=split, shuffle_files=False)
  if "image_id" not in ds.element_spec:
    raise DataError(f"dataset {config.dataset} has no image_id feature; COCO "
                    "evaluation matches detections to ground truth by it")
  ds = ds.map(lambda ex: instances.select_instances(ex, _ALL_INSTANCES, drop_crowd=False),
              num_parallel_calls=tf.data.AUTOTUNE)
  for ex in pipeline._checked(ds.prefetch(2), config, lambda *_: None):
    height, width = ex["image"].shape[:2]
    yield {"image_id": int(ex["image_id"]), "height": height, "width": width,
           "boxes": ex["boxes"], "classes": ex["classes"], "masks": ex["masks"],
           "crowd": ex["crowd"]}


def class_names(config):
  """The dataset's object class names, index 0 "background"; "class k" for
  each of the num_classes - 1 classes when the dataset names none."""
  try:
    return ["background", *pipeline._builder(config).info.features["objects"]["label"].names]
  except (KeyError, AttributeError, TypeError):
    return ["background"] + [f"class {k}" for k in range(1, config.num_classes)]


def _detections(trainer, state, split):
  """Runs the detection step over the split's evaluation batches.

  Yields, on every process, for every real image of the global batches:
  (image_id, detections of detect_step for the image, image_size,
  orig_size), numpy.
  """
  batches = instances.eval_batches(trainer.config, split=split,
                                   local_devices=len(trainer.par.local_devices))
  for batch in batches:
    out = trainer.par.gather(trainer.detect_fn(
        state, trainer.par.put_batch(step_inputs(batch, EVAL_KEYS))))
    for i in np.flatnonzero(out["mask"]):
      one = {k: out[k][i] for k in ("boxes", "scores", "classes", "valid", "mask_probs")}
      yield int(out["image_id"][i]), one, out["image_size"][i], out["orig_size"][i]


def _ground_truth_state(trainer, split):
  """The split's ground truth as a CocoEvaluator state, read and encoded once
  per run (it is the same at every evaluation)."""
  if split not in trainer.ground_truth:
    gt = coco_eval.CocoEvaluator(trainer.config.num_classes)
    for ex in ground_truth(trainer.config, split):
      gt.add_ground_truth(ex["image_id"], ex["height"], ex["width"], ex["boxes"],
                          ex["classes"], ex["masks"], ex["crowd"])
    trainer.ground_truth[split] = gt.state()
  return trainer.ground_truth[split]


def evaluate(trainer, state, split=None, progress=None):
  """COCO box and mask AP of the split (coco_eval.CocoEvaluator.summary keys).

  Every process must call it (the detection step is collective); the scores
  are computed on process 0, other processes return {}. `progress` wraps the
  iterator of evaluated images (e.g. a counter that prints).
  """
  config = trainer.config
  split = split or config.eval.split
  images = _detections(trainer, state, split)
  if progress is not None:
    images = progress(images)
  if jax.process_index() != 0:
    for _ in images:  # Only to run the collective steps.
      pass
    return {}
  evaluator = coco_eval.CocoEvaluator(config.num_classes, class_names(config))
  for image_id, one, image_size, orig_size in images:
    dets = to_original(one, image_size, orig_size)
    evaluator.add_detections(image_id, dets["boxes"], dets["scores"], dets["classes"],
                             dets["masks"])
  evaluator.merge(_ground_truth_state(trainer, split))
  return evaluator.summary()


def summary_line(result):
  """The headline figures of `evaluate`'s result, for the log."""
  if not result:
    return ""
  return (f"mask AP {result['mask_ap']:.4f} | mask AP50 {result['mask_ap50']:.4f} | "
          f"box AP {result['box_ap']:.4f} | box AP50 {result['box_ap50']:.4f}")


def predict_files(trainer, state, paths, output_dir, score_thresh=0.5):
  """Detects objects in image files and writes what it found, per image:

    <name>_instances.png   the image with each detection's mask, box and
                           "class score" label (score >= score_thresh)
    <name>_instance_ids.png  palette PNG, pixel = 1 + index of the detection
                           it belongs to (0 none), best score on top
    <name>_detections.json  every detection above 0.05 (the model's own
                           threshold): box (x1, y1, x2, y2) pixels, score,
                           class id and name

  Images are resized and padded as in evaluation (config.instances), and
  the detections mapped back to the file's own size.

  Returns:
    list of written file paths.
  """
  import json
  import os
  from segjax import inference, viz
  config = trainer.config
  s = instances.settings(config)
  host = trainer.par.host_state(state)
  variables = {"params": host.params, "batch_stats": host.batch_stats}
  detect = jax.jit(functools.partial(trainer.model.apply, train=False, paste=False))
  names = class_names(config)
  os.makedirs(output_dir, exist_ok=True)
  written = []
  for path in paths:
    image = inference.read_image(path)
    ex = instances.eval_transform(
        {"image": tf.constant(image), "boxes": tf.zeros([0, 4]),
         "classes": tf.zeros([0], tf.int32), "crowd": tf.zeros([0], tf.bool),
         "masks": tf.zeros([0, *image.shape[:2]], tf.uint8)},
        s, tuple(config.augment.mean), tuple(config.augment.std))
    image_size = ex["image_size"].numpy()
    out = jax.device_get(detect(variables, ex["image"].numpy()[None], image_size[None]))
    dets = to_original({k: v[0] for k, v in out.items()}, image_size, image.shape[:2])
    stem = os.path.join(output_dir, os.path.splitext(os.path.basename(path))[0])
    drawn = viz.draw_instances(image, dets["boxes"], dets["classes"], dets["scores"],
                               dets["masks"], names, score_thresh=score_thresh)
    ids = viz.instance_map(dets["masks"], dets["scores"], score_thresh)
    viz.save_png(f"{stem}_instances.png", drawn)
    viz.save_png(f"{stem}_instance_ids.png", np.minimum(ids, 255).astype(np.uint8),
                 viz.palette(256))
    rows = [json.dumps({"box": [round(float(v), 2) for v in box], "score": round(float(p), 4),
                        "class": int(c), "name": names[int(c)]})
            for box, p, c in zip(dets["boxes"], dets["scores"], dets["classes"])]
    with open(f"{stem}_detections.json", "w") as f:  # One detection a line.
      f.write("[\n" + ",\n".join(rows) + "\n]\n")
    written += [f"{stem}_instances.png", f"{stem}_instance_ids.png",
                f"{stem}_detections.json"]
  return written
