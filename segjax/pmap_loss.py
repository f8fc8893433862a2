"""A loss's per-device objective under `jax.pmap`: every loss of
segjax.losses gives jit's gradient when the batch is split over devices.
"""
import jax
import jax.numpy as jnp


def device_objective(loss_fn, outputs, batch, axis_name=None):
  """This device's part of the global loss, for a step under `jax.pmap`.

  Under jit the loss sees the global batch. Under pmap each device holds
  a slice of it, and the step sums (psum) the devices' gradients; this
  returns, for each device, an objective whose gradients sum to the gradient
  of the loss of the whole batch, so pmap trains exactly as jit does:

  - A weighted mean over pixels (PIXEL_MEAN_TOTALS; a "sum" or aux_weight
    made only of those): the device's mean times its share of the global
    weight total, per term. Only scalars cross devices.
  - Any other loss (OHEM's global selection, the region losses' class sums
    over the batch, Lovász's global sort, ...): the outputs and the batch's
    labels and weights are all-gathered, every device computes the global
    loss and its gradient w.r.t. the gathered outputs, and the objective is
    <that gradient's slice for this device, the device's outputs>. Its
    gradient is the device's share of the chain rule, whatever the loss, and
    nothing is differentiated through a collective. The cost is one copy of
    the global outputs on each device, as jit's loss has.

  Args:
    loss_fn: `loss_fn(outputs, batch) -> scalar` of the global batch, e.g.
      from `make_loss`.
    outputs: the model's outputs on this device's slice (leading axis the
      slice's examples).
    batch: this device's slice: "label" [b, H, W] and optionally "weight"
      ([b] or [b, H, W]); "image" is not gathered.
    axis_name: the pmap axis, or None under jit.

  Returns:
    (objective, loss): float32 scalars; `loss` is the global loss, the same
    on every device.
  """
  if axis_name is None:
    loss = loss_fn(outputs, batch)
    return loss, loss
  if _splits(loss_fn):
    objective = _split_objective(loss_fn, outputs, batch, axis_name)
    return objective, jax.lax.psum(objective, axis_name)
  return _gathered_objective(loss_fn, outputs, batch, axis_name)


def _splits(loss_fn) -> bool:
  """Whether loss_fn is a weighted mean, or a weighted sum of such means."""
  if hasattr(loss_fn, "pixel_total"):
    return True
  terms = getattr(loss_fn, "terms", None)
  return terms is not None and all(_splits(t) for t in terms)


def _split_objective(loss_fn, outputs, batch, axis_name):
  if hasattr(loss_fn, "pixel_total"):
    total = loss_fn.pixel_total(outputs, batch)
    global_total = jax.lax.psum(total, axis_name)
    # The loss is 0 where its total is, so a zero global total gives 0.
    share = total / jnp.where(global_total > 0, global_total, 1.0)
    return loss_fn(outputs, batch) * jax.lax.stop_gradient(share)
  return sum(w * _split_objective(fn, o, batch, axis_name)
             for w, fn, o in loss_fn.parts(outputs))


def _gathered_objective(loss_fn, outputs, batch, axis_name):
  gather = lambda x: jax.lax.all_gather(x, axis_name, tiled=True)
  leaves, treedef = jax.tree_util.tree_flatten(outputs)
  floating = [jnp.issubdtype(jnp.result_type(x), jnp.floating) for x in leaves]
  full = [gather(jax.lax.stop_gradient(x)) for x in leaves]
  targets = {k: gather(v) for k, v in batch.items() if k != "image"}

  def global_loss(float_leaves):
    it = iter(float_leaves)
    rebuilt = [next(it) if f else x for x, f in zip(full, floating)]
    return loss_fn(jax.tree_util.tree_unflatten(treedef, rebuilt), targets)

  loss, cotangents = jax.value_and_grad(global_loss)(
      [x for x, f in zip(full, floating) if f])
  index = jax.lax.axis_index(axis_name)
  objective = 0.0
  for x, cot in zip([x for x, f in zip(leaves, floating) if f], cotangents):
    mine = jax.lax.dynamic_slice_in_dim(cot, index * x.shape[0], x.shape[0])
    objective = objective + jnp.vdot(mine.astype(jnp.float32),
                                     x.astype(jnp.float32))
  return objective, loss
