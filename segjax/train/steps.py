"""The compiled steps, pure top-level functions: train_step and eval_step
for semantic models, instance_train_step and detect_step for detectors,
sharing apply_gradients (the optimizer update and its NaN/Inf guard).

Both are compiled by `segjax.train.parallel` either with `jax.jit` over a
device mesh (default: arrays are global, so means, gradients and BatchNorm
statistics are global without any collective in this file) or with
`jax.pmap` (`axis_name` set: the few cross-device reductions below become
explicit `psum`s over that axis).
"""
import jax
import jax.numpy as jnp
import optax

from segjax import losses, metrics
from segjax.models.detection import mask_rcnn
from segjax.ops import resize


def _psum(x, axis_name):
  return jax.lax.psum(x, axis_name) if axis_name else x


def train_step(state, batch, rng, *, model, tx, loss_fn, schedule,
               ignore_index=255, axis_name=None):
  """One optimizer update.

  Args:
    state: TrainState.
    batch: dict with "image" [B,H,W,3] float32, "label" [B,H,W] int32
      (255 = ignore) and optionally "weight" [B,H,W] float32 pixel weights.
    rng: PRNG key shared by all steps; folded with the step for dropout.
    model, tx, loss_fn, schedule: static pieces (bound with functools.partial).
      `loss_fn(outputs, batch)` returns the loss of the batch.
    ignore_index: unused (the loss has its own); kept for callers.
    axis_name: pmap axis name, or None under jit.

  Returns:
    (new state, metrics dict of float32 scalars: loss, grad_norm,
    learning_rate, finite).
  """
  dropout_rng = jax.random.fold_in(rng, state.step)
  if axis_name:  # Different dropout masks on each device, as under jit.
    dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))

  def objective(params):
    outputs, new_vars = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, batch["image"],
        train=True, mutable=["batch_stats"], rngs={"dropout": dropout_rng})
    # Under pmap, this device's part of the global loss: the psum of the
    # devices' gradients is the gradient jit computes, for every loss.
    part, loss = losses.device_objective(loss_fn, outputs, batch, axis_name)
    return part, (loss, new_vars.get("batch_stats", {}))

  grads, (loss, batch_stats) = jax.grad(objective, has_aux=True)(state.params)
  grads = _psum(grads, axis_name)
  return apply_gradients(state, grads, loss, batch_stats, tx=tx, schedule=schedule)


def apply_gradients(state, grads, loss, batch_stats, *, tx, schedule):
  """The optimizer update of `grads`, applied only if everything is finite.

  Args:
    state: TrainState before the step.
    grads: gradients of `loss` w.r.t. state.params (already reduced over
      devices under pmap).
    loss: float32 scalar, the step's loss.
    batch_stats: the BatchNorm statistics after the step.

  Returns:
    (new state, metrics dict of float32 scalars: loss, grad_norm,
    learning_rate, finite).
  """
  grad_norm = optax.global_norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  # A NaN/Inf step changes nothing but the counters; the loop reads the
  # counter at its logging cadence, so there is no host sync per step. An
  # update that overflows the parameters counts too: saving it would turn a
  # good checkpoint bad.
  params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p))
                                     for p in jax.tree_util.tree_leaves(params)]))
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & params_finite
  keep = lambda new, old: jax.tree_util.tree_map(
      lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(
      step=state.step + 1,
      params=keep(params, state.params),
      batch_stats=keep(batch_stats, state.batch_stats),
      opt_state=keep(opt_state, state.opt_state),
      nonfinite=state.nonfinite + (~finite).astype(jnp.int32))
  step_metrics = dict(loss=loss, grad_norm=grad_norm,
                      learning_rate=jnp.asarray(schedule(state.step), jnp.float32),
                      finite=finite.astype(jnp.float32))
  return new_state, step_metrics


def instance_train_step(state, batch, rng, *, model, tx, schedule, axis_name=None):
  """One optimizer update of a detector (segjax.models.DETECTORS).

  Args:
    state: TrainState.
    batch: segjax.data.instances' training batch: "image" [B,H,W,3],
      "image_size" [B,2], "boxes" [B,G,4], "classes" [B,G], "masks"
      [B,G,H,W], "valid" [B,G] (other keys are ignored).
    rng: PRNG key shared by all steps; folded with the step for the anchor
      and ROI samplers.
    model, tx, schedule: static. Frozen params (mask_rcnn.trainable_mask)
      get zero gradient inside the model and a zero update from `tx`.
    axis_name: pmap axis name, or None under jit.

  Returns:
    (new state, metrics: apply_gradients' plus each of Mask R-CNN's losses,
    loss_objectness, loss_rpn_box_reg, loss_classifier, loss_box_reg,
    loss_mask).

  Under jit the losses are normalised over the global batch, as one
  torchvision process with the whole batch. Under pmap each device
  normalises over its own images and gradients are averaged: torchvision's
  DistributedDataParallel.
  """
  key = jax.random.fold_in(rng, state.step)
  if axis_name:  # Different samples on each device.
    key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))

  def objective(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    out, updates = mask_rcnn.train_losses(model, variables, batch, key)
    return out["loss"], (out, updates.get("batch_stats", state.batch_stats))

  grads, (parts, batch_stats) = jax.grad(objective, has_aux=True)(state.params)
  if axis_name:
    grads = jax.lax.pmean(grads, axis_name)
    parts = jax.lax.pmean(parts, axis_name)
  new_state, step_metrics = apply_gradients(state, grads, parts.pop("loss"), batch_stats,
                                            tx=tx, schedule=schedule)
  return new_state, {**step_metrics, **parts}


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
    [B,D] and "mask_probs" [B,D,M,M] (each in its box's frame).
  """
  del axis_name
  dets = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                     batch["image"], batch["image_size"], train=False, paste=False)
  passed = {k: batch[k] for k in ("image_size", "image_id", "orig_size", "mask")
            if k in batch}
  return {**passed, **dets}


def eval_step(state, batch, confusion, *, model, num_classes, ignore_index=255,
              axis_name=None):
  """Adds one batch to the running confusion matrix.

  Args:
    state: TrainState.
    batch: dict with "image" [B,h,w,3], "label" [B,H,W] int32 and "mask" [B]
      (1 for real examples, 0 for the padding that fills the last batch).
      When the image was resized to the model's size (h, w) != (H, W), the
      logits are resized back bilinearly and scored at the labels' size.
    confusion: [K, K] int32 running confusion matrix (rows ground truth).

  Returns:
    [K, K] int32 updated confusion matrix.
  """
  outputs = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                        batch["image"], train=False)
  logits = outputs["logits"]
  if logits.shape[1:3] != batch["label"].shape[1:3]:
    logits = resize(logits, batch["label"].shape[1:3])
  predictions = jnp.argmax(logits, axis=-1)
  cm = metrics.confusion_matrix(batch["label"], predictions, num_classes,
                                ignore_index=ignore_index, weights=batch["mask"])
  return confusion + _psum(cm, axis_name)


def predict_step(variables, images, *, model):
  """Class probabilities [B,H,W,K] float32 for images [B,H,W,3]."""
  outputs = model.apply(variables, images, train=False)
  return jax.nn.softmax(outputs["logits"].astype(jnp.float32), axis=-1)
