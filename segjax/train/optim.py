"""optax optimizers and learning-rate schedules built from the config."""
from typing import Any, Callable, Tuple

import jax
import optax

from segjax.config import option
from segjax.errors import ConfigError


def make_schedule(opt, total_steps: int) -> optax.Schedule:
  """Learning rate per step: linear warmup, then constant, poly, cosine or step.

  `poly` is DeepLab's lr * (1 - t/T)^power; `cosine` decays to
  lr * end_factor. Both count t from the end of the warmup. `step` is
  Detectron's multi-step schedule: lr times decay_factor (0.1) at each of
  `milestones`, absolute step numbers (Mask R-CNN's 1x: 60k and 80k of
  90k). The warmup rises linearly from lr / warmup_steps (Detectron's
  warmup factor 0.001 for its 1000 steps).
  """
  lr = opt.learning_rate
  warmup = min(opt.warmup_steps, max(total_steps - 1, 0))
  decay_steps = max(total_steps - warmup, 1)
  end = lr * option(opt, "optimizer", "end_factor")
  if opt.schedule == "constant":
    main = optax.constant_schedule(lr)
  elif opt.schedule == "poly":
    main = optax.polynomial_schedule(lr, end, option(opt, "optimizer", "poly_power"),
                                     decay_steps)
  elif opt.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps,
                                       alpha=option(opt, "optimizer", "end_factor"))
  elif opt.schedule == "step":
    milestones = sorted(int(m) for m in option(opt, "optimizer", "milestones"))
    if not milestones or milestones[0] <= warmup:
      raise ConfigError(f"optimizer.schedule 'step' needs optimizer.milestones, step "
                        f"numbers after the warmup ({warmup}), e.g. (60000, 80000); "
                        f"got {tuple(option(opt, 'optimizer', 'milestones'))}")
    factor = option(opt, "optimizer", "decay_factor")
    main = optax.piecewise_constant_schedule(lr, {m - warmup: factor for m in milestones})
  else:
    raise ConfigError(f"optimizer.schedule {opt.schedule!r} is unknown; use "
                      "'constant', 'poly', 'cosine' or 'step'")
  if warmup == 0:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(lr / warmup, lr, warmup), main], [warmup])


def make_optimizer(opt, total_steps: int
                   ) -> Tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optax transformation, schedule) for `config.optimizer`.

  Weight decay is decoupled for AdamW and L2-added-to-gradient for SGD and
  Adam (as torch.optim's SGD and Adam apply `weight_decay`, and the papers'
  Caffe/PyTorch recipes); it skips 1-D parameters (biases, norm scales) in
  all three, the common practice.
  """
  schedule = make_schedule(opt, total_steps)
  if opt.name not in ("sgd", "adamw", "adam"):
    raise ConfigError(f"optimizer.name {opt.name!r} is unknown; use 'sgd', 'adamw' "
                      "or 'adam'")
  lr_mult = dict(option(opt, "optimizer", "lr_mult") or {})
  if lr_mult:
    core = _per_module_rates(opt, schedule, lr_mult)
  else:
    core = _core(opt, schedule)
  clip = option(opt, "optimizer", "grad_clip_norm")
  tx = optax.chain(optax.clip_by_global_norm(clip), core) if clip else core
  return tx, schedule


def _core(opt, schedule):
  if opt.name == "adamw":
    return optax.adamw(schedule, weight_decay=opt.weight_decay, mask=_matrices_only)
  # SGD and Adam: the decay is added to the gradient, as torch.optim does.
  step = (optax.sgd(schedule, momentum=opt.momentum or None) if opt.name == "sgd"
          else optax.adam(schedule))
  return optax.chain(optax.add_decayed_weights(opt.weight_decay, mask=_matrices_only),
                     step)


def _per_module_rates(opt, schedule, lr_mult):
  """`optimizer.lr_mult`: {top-level module name: learning-rate factor}, e.g.
  {"decode_head": 10.0} as SegFormer and SETR train their heads (mmseg's
  paramwise lr_mult). Other modules keep the base rate."""
  def labels(params):
    unknown = sorted(set(lr_mult) - set(params))
    if unknown:
      raise ConfigError(
          f"optimizer.lr_mult names {', '.join(unknown)}, which the model does "
          f"not have; its top-level modules are {', '.join(sorted(params))}")
    return {k: jax.tree_util.tree_map(lambda _, k=k: k if k in lr_mult else "",
                                      v) for k, v in params.items()}
  transforms = {"": _core(opt, schedule)}
  for name, factor in lr_mult.items():
    transforms[name] = _core(opt, lambda step, f=float(factor): f * schedule(step))
  return optax.multi_transform(transforms, labels)


def _matrices_only(params):
  """Weight-decay mask: True for kernels, False for biases and norm scales."""
  return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def freeze(tx: optax.GradientTransformation, trainable: Callable[[Any], Any]
           ) -> optax.GradientTransformation:
  """`tx` for the params that train; zero updates and no optimizer state for
  the others, so that weight decay cannot move them either.

  Args:
    tx: the optax transformation of the trained params.
    trainable: params -> pytree of bools of the same structure (True: train),
      e.g. functools.partial(mask_rcnn.trainable_mask, model).
  """
  def labels(params):
    return jax.tree_util.tree_map(lambda t: "train" if t else "frozen", trainable(params))
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
