"""Instance segmentation (Mask R-CNN) and detection (Faster R-CNN): the
papers' losses, COCO AP.

Training reads segjax.data.instances' stream; frozen parameters
(mask_rcnn.trainable_mask) get no update. Evaluation follows torchvision's
reference (references/detection): the detector runs on the resized, padded
canvas (with instances.group_by_aspect, its orientation's: one compilation
per canvas), sharded over every device of every host; each detection's box is
scaled back to the image as stored and its mask pasted there
(segjax.detections); pycocotools then scores boxes and masks against the
ground truth at that resolution, crowd regions included, on process 0.
A detector without masks (`model.masks` False: Faster R-CNN) trains without
the masks on the device and is scored on boxes alone.
"""
import functools
from typing import Callable, Dict, List, Optional, Sequence

import jax
import numpy as np

from segjax import coco_eval, detections, predict
from segjax.data import ground_truth, instances
from segjax.models.detection import mask_rcnn
from segjax.tasks.base import Task
from segjax.train import optim

# The keys of an instance batch the compiled steps read; the rest (crowd,
# num_dropped, int64 ids) stays on the host, and so do the mask crops of a
# detector without masks (`train_keys`).
TRAIN_KEYS = ("image", "image_size", "boxes", "classes", "mask_crops", "mask_boxes",
              "valid")
MASK_KEYS = ("mask_crops", "mask_boxes")
EVAL_KEYS = ("image", "image_size", "orig_size", "mask", "image_id")


def train_keys(model):
  """TRAIN_KEYS, less the mask crops for a detector without masks: its
  losses never read them."""
  return TRAIN_KEYS if model.masks else tuple(k for k in TRAIN_KEYS if k not in MASK_KEYS)


def iou_types(model):
  """What COCO scores: boxes and masks, or boxes alone without masks."""
  return coco_eval.IOU_TYPES if model.masks else ("bbox",)


def objective(model, variables, batch, key, axis_name=None):
  """The detector's summed losses of one batch (steps.Objective).

  Under jit the losses are normalised over the global batch, as one
  torchvision process with the whole batch. Under pmap each device
  normalises over its own images and the gradients are averaged:
  torchvision's DistributedDataParallel.

  Args:
    batch: segjax.data.instances' training batch: "image" [B,H,W,3],
      "image_size" [B,2], "boxes" [B,G,4], "classes" [B,G], "mask_crops"
      [B,G,M,M] and "mask_boxes" [B,G,4] (with model.masks), "valid" [B,G].
    key: the anchor and ROI samplers' key.
  """
  out, updates = mask_rcnn.train_losses(model, variables, batch, key)
  if axis_name:  # Each device's share of the mean over devices.
    out = jax.tree_util.tree_map(lambda x: x / jax.lax.psum(1, axis_name), out)
  return out["loss"], out, updates.get("batch_stats", variables["batch_stats"])


def detect_step(state, batch, *, model, axis_name=None):
  """Detections of an evaluation batch, in the canvas frame (no pasting).

  Args:
    state: TrainState.
    batch: "image" [B,H,W,3] and "image_size" [B,2] int32 (the resized
      image within the canvas); other keys are passed through.
    axis_name: unused (pmap calls every step with it).

  Returns:
    The batch's "image_size", "image_id", "orig_size" and "mask" with the
    detector's "boxes" [B,D,4], "scores" [B,D], "classes" [B,D], "valid"
    [B,D] and, with masks, "mask_probs" [B,D,M,M] (each in its box's frame).
  """
  del axis_name
  dets = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                     batch["image"], batch["image_size"], train=False, paste=False)
  passed = {k: batch[k] for k in ("image_size", "image_id", "orig_size", "mask")
            if k in batch}
  return {**passed, **dets}


def step_inputs(batch, keys):
  """The host batch's arrays the step reads (ids as int32, as jax keeps them)."""
  out = {k: batch[k] for k in keys if k in batch}
  if "image_id" in out:
    out["image_id"] = out["image_id"].astype(np.int32)
  return out


class InstanceTask(Task):
  name = "instance"

  def __init__(self, config, model, par):
    super().__init__(config, model, par)
    self._detect_fn = None
    self._ground_truth = {}  # split -> CocoEvaluator state, read once per run

  @property
  def init_shape(self):
    return (128, 128, 3)  # Detector parameters do not depend on the size.

  def wrap_optimizer(self, tx):
    return optim.freeze(tx, functools.partial(mask_rcnn.trainable_mask, self.model))

  def objective(self):
    return objective

  def train_batches(self, start_step):
    keys = train_keys(self.model)
    return (step_inputs(b, keys)
            for b in instances.train_batches(self.config, start_step=start_step))

  @property
  def detect_fn(self):
    if self._detect_fn is None:
      self._detect_fn = self.par.compile(detect_step, model=self.model)
    return self._detect_fn

  def _detections(self, state, split):
    """Yields, on every process, for every real image of the global
    evaluation batches: (image_id, detections of detect_step for the image,
    image_size, orig_size), numpy."""
    batches = instances.eval_batches(self.config, split=split,
                                     local_devices=len(self.par.local_devices))
    for batch in batches:
      out = self.par.gather(self.detect_fn(
          state, self.par.put_batch(step_inputs(batch, EVAL_KEYS))))
      for i in np.flatnonzero(out["mask"]):
        one = {k: out[k][i] for k in ("boxes", "scores", "classes", "valid", "mask_probs")
               if k in out}
        yield int(out["image_id"][i]), one, out["image_size"][i], out["orig_size"][i]

  def _ground_truth_state(self, split):
    """The split's ground truth as a CocoEvaluator state, read and encoded
    once per run (it is the same at every evaluation)."""
    if split not in self._ground_truth:
      gt = coco_eval.CocoEvaluator(self.config.num_classes,
                                   iou_types=iou_types(self.model))
      for ex in ground_truth.instance_ground_truth(self.config, split):
        gt.add_ground_truth(ex["image_id"], ex["height"], ex["width"], ex["boxes"],
                            ex["classes"], ex["masks"], ex["crowd"])
      self._ground_truth[split] = gt.state()
    return self._ground_truth[split]

  def evaluate(self, state, split, progress: Optional[Callable] = None) -> Dict:
    """COCO box and mask AP, or box AP alone without masks
    (coco_eval.CocoEvaluator.summary keys) on process 0; other processes
    return {}."""
    images = self._detections(state, split)
    if progress is not None:
      images = progress(images)
    if jax.process_index() != 0:
      for _ in images:  # Only to run the collective steps.
        pass
      return {}
    evaluator = coco_eval.CocoEvaluator(self.config.num_classes,
                                        ground_truth.class_names(self.config),
                                        iou_types(self.model))
    for image_id, one, image_size, orig_size in images:
      dets = detections.to_original(one, image_size, orig_size)
      evaluator.add_detections(image_id, dets["boxes"], dets["scores"], dets["classes"],
                               dets.get("masks"))
    evaluator.merge(self._ground_truth_state(split))
    return evaluator.summary()

  def describe_eval(self):
    return "COCO box and mask AP" if self.model.masks else "COCO box AP"

  def summary_line(self, result):
    if not result:
      return ""
    box = f"box AP {result['box_ap']:.4f} | box AP50 {result['box_ap50']:.4f}"
    if not self.model.masks:
      return box
    return (f"mask AP {result['mask_ap']:.4f} | mask AP50 {result['mask_ap50']:.4f} | "
            + box)

  def report(self, result) -> List[str]:
    if not result:
      return []
    names = ground_truth.class_names(self.config)
    kind = "mask" if self.model.masks else "box"
    per_class = ", ".join(f"{n} {v:.3f}"
                          for n, v in zip(names[1:], result[f"{kind}_per_class_ap"]))
    return [f"per-class {kind} AP: {per_class}"]

  def predict_files(self, variables, paths: Sequence[str], output_dir: str):
    return predict.instance_files(self.model, variables, self.config, paths, output_dir)
