"""Semantic segmentation: a per-pixel loss, mIoU image by image.

Training reads segjax.data.pipeline's stream and differentiates the
config's loss (segjax.losses). Evaluation runs the config's `eval` protocol
on every image at its own size, spread over every device
(segjax.evaluation), so the figure logged during training is the figure
`segjax eval` gives for the same checkpoint.
"""
import functools
from typing import Callable, Dict, List, Optional, Sequence

import jax

from segjax import evaluation, inference, losses, pmap_loss, predict
from segjax.data import pipeline
from segjax.tasks.base import Task
from segjax.train import steps


def objective(model, variables, batch, key, axis_name=None, *, loss_fn):
  """The config's loss of one batch (steps.Objective).

  Args:
    batch: "image" [B,H,W,3] float32, "label" [B,H,W] int32 (255 = ignore)
      and optionally "weight" [B,H,W] float32 pixel weights.
    key: the dropout key.
    loss_fn: `loss_fn(outputs, batch)`, the loss of the (global) batch.
  """
  outputs, new_vars = model.apply(variables, batch["image"], train=True,
                                  mutable=["batch_stats"], rngs={"dropout": key})
  # Under pmap, this device's part of the global loss: the psum of the
  # devices' gradients is the gradient jit computes, for every loss.
  part, loss = pmap_loss.device_objective(loss_fn, outputs, batch, axis_name)
  if axis_name:  # `loss` is global; the step sums the devices' parts.
    loss = loss / jax.lax.psum(1, axis_name)
  return part, {"loss": loss}, new_vars.get("batch_stats", {})


def make_objective(loss_fn) -> steps.Objective:
  """The objective of `loss_fn(outputs, batch)` for steps.train_step."""
  return functools.partial(objective, loss_fn=loss_fn)


class SemanticTask(Task):
  name = "semantic"

  def __init__(self, config, model, par):
    super().__init__(config, model, par)
    self.segmenter = inference.Segmenter(
        model, inference.InferenceOptions.from_config(config.eval))
    self._scorer = None

  @property
  def scorer(self) -> evaluation.ShardedScorer:
    """The per-image scorer on this process's devices (built when first used)."""
    if self._scorer is None:
      self._scorer = evaluation.ShardedScorer(
          self.segmenter, self.config.num_classes, self.par.local_devices,
          evaluation.per_device_images(self.config.eval.batch_size, self.par.num_devices))
    return self._scorer

  def objective(self):
    return make_objective(losses.make_loss(self.config.loss))

  def train_batches(self, start_step):
    return pipeline.train_batches(self.config, start_step=start_step)

  def evaluate(self, state, split, progress: Optional[Callable] = None) -> Dict:
    variables = self.par.local_variables(state)
    return evaluation.evaluate(self.scorer, variables,
                               pipeline.eval_examples(self.config, split=split), progress)

  def describe_eval(self):
    o = self.segmenter.options
    return (f"{o.mode} inference" + (f" at {o.resize_to}" if o.resize_to else "")
            + f", scales {tuple(o.scales)}, flip {o.flip}")

  def summary_line(self, result):
    return f"mIoU {result['miou']:.4f} | pixel acc {result['pixel_accuracy']:.4f}"

  def report(self, result) -> List[str]:
    per_class = ", ".join("nan" if v != v else f"{v:.3f}" for v in result["per_class_iou"])
    return [f"mean accuracy {result['mean_accuracy']:.4f}", f"per-class IoU: {per_class}"]

  def predict_files(self, variables, paths: Sequence[str], output_dir: str):
    return predict.semantic_files(self.model, variables, self.config, paths, output_dir)
