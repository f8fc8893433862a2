"""Per-device memory of the train step at the papers' settings, with and without remat.

    python benchmarks/bench_memory.py --out bench_memory.json          # the plan (slow: see below)
    python benchmarks/bench_memory.py --models unet --dtypes float32 --no-remat
    python benchmarks/bench_memory.py --time --models unet,deeplab_v3 --time-size 128

Nothing large is allocated: the train state and the batch are abstract
(jax.eval_shape, jax.ShapeDtypeStruct), and each row is the compiled
program's own accounting (`compiled.memory_analysis()`): the arguments
(state and batch), the outputs (the new state, which aliases the donated
old one) and XLA's scratch buffer for everything live in between
(activations kept for the backward pass, gradients, temporaries):

    peak = arguments + outputs - aliased + temp

The step is the one `segjax train` compiles: segjax.train.steps.train_step
with the config's task objective (Mask R-CNN's losses for detectors), model,
loss and optimizer (its lr_mult and, for the detector, the frozen stages), the state
donated. Rows: the per-device batch and crop of each paper's recipe.

Where the figures come from: XLA:CPU's buffer assignment, compiled as an
accelerator compiles remat (segjax.models.remat.KEEP_REMAT; XLA:CPU would
otherwise merge the recomputation away) and with LLVM's optimisation off
(it changes the machine code, not the buffers). A GPU's compiler fuses
differently and cuDNN adds workspace, so treat them as a plan (which
batch fits on which device, what remat buys) to be confirmed on the device
(benchmarks/accelerator.py prints the device's own peak).

--time also times the step on this CPU at a small size (--time-size, batch
1), remat on and off, to show what the recomputation costs.
"""
import argparse
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from segjax import config as config_lib
from segjax import models, tasks
from segjax.data.mask_crops import MASK_CROP_SIZE as CROP
from segjax.models.detection import mask_rcnn
from segjax.models.remat import KEEP_REMAT
from segjax.train import optim, steps
from segjax.train.state import init_state

from timing import fmt, median_time, write_rows

# name -> (config file, model_kwargs overrides, (H, W) per image, per-device batch)
PLAN = {
    "deeplab_v3": ("configs/deeplab_v3_voc.py", {}, (513, 513), 2),  # R101, OS 16
    "segformer_b5": ("configs/segformer_b5_cityscapes.py", {}, (1024, 1024), 1),
    "setr_pup": ("configs/setr_pup_cityscapes.py", {}, (768, 768), 1),  # ViT-L, aux heads
    "mask_rcnn_r50_fpn": ("configs/mask_rcnn_r50_fpn_coco.py", {}, (800, 1344), 2),
    # The paper's widths (64 .. 1024) and tile; BatchNorm and "same" padding
    # as configs/unet_shapes.py trains it.
    "unet": ("configs/unet_shapes.py", dict(base_width=64, depth=4), (572, 572), 8),
}
# LLVM's optimisation changes code, not buffers: off, compiling is faster.
MEMORY_OPTIONS = {**KEEP_REMAT, "xla_backend_optimization_level": 0}
GIB = 2**30


def build(name, dtype, remat, size=None):
  """(model, tx, schedule, config) of a PLAN row as `segjax train` builds them."""
  path, overrides, _, _ = PLAN[name]
  config = config_lib.load_config(path)
  kwargs = {**dict(config.model_kwargs), **overrides, "remat": remat}
  model = models.build(config.model, config.num_classes, dtype=getattr(jnp, dtype), **kwargs)
  tx, schedule = optim.make_optimizer(config.optimizer, config.train.steps)
  if models.task(config.model) == "instance":
    tx = optim.freeze(tx, functools.partial(mask_rcnn.trainable_mask, model))
  return model, tx, schedule, config


def abstract_inputs(name, model, tx, config, hw, n):
  """(state, batch, key) as ShapeDtypeStructs: nothing is allocated."""
  detector = models.task(config.model) == "instance"
  init_shape = (128, 128, 3) if detector else (*hw, 3)  # detector params are size-free
  state = jax.eval_shape(lambda key: init_state(model, tx, key, init_shape),
                         jax.random.PRNGKey(0))
  spec = jax.ShapeDtypeStruct
  if detector:
    g = config.instances.max_instances
    batch = {"image": spec((n, *hw, 3), jnp.float32), "image_size": spec((n, 2), jnp.int32),
             "boxes": spec((n, g, 4), jnp.float32), "classes": spec((n, g), jnp.int32),
             "mask_crops": spec((n, g, CROP, CROP), jnp.uint8),
             "mask_boxes": spec((n, g, 4), jnp.float32), "valid": spec((n, g), jnp.bool_)}
  else:
    batch = {"image": spec((n, *hw, 3), jnp.float32), "label": spec((n, *hw), jnp.int32)}
  return state, batch, jax.eval_shape(lambda: jax.random.PRNGKey(1))


def step_fn(name, model, tx, schedule, config):
  """The train step `segjax train` compiles for this config."""
  return functools.partial(steps.train_step, model=model, tx=tx, schedule=schedule,
                           objective=tasks.for_config(config, model, None).objective())


def memory_row(name, dtype, remat):
  """One row of the plan: XLA's memory analysis of the compiled step."""
  model, tx, schedule, config = build(name, dtype, remat)
  _, _, hw, n = PLAN[name]
  state, batch, key = abstract_inputs(name, model, tx, config, hw, n)
  start = time.perf_counter()
  lowered = jax.jit(step_fn(name, model, tx, schedule, config),
                    donate_argnums=0).lower(state, batch, key)
  compiled = lowered.compile(MEMORY_OPTIONS)
  seconds = time.perf_counter() - start
  m = compiled.memory_analysis()
  params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(state.params))
  peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)
  return dict(model=name, input=f"{hw[0]}x{hw[1]}", batch=n, dtype=dtype, remat=remat,
              params_m=params / 1e6, arguments_gib=m.argument_size_in_bytes / GIB,
              temp_gib=m.temp_size_in_bytes / GIB, peak_gib=peak / GIB, compile_s=seconds)


def time_row(name, dtype, remat, size, runs):
  """Seconds per train step on this CPU at size x size, batch 1 (the
  detector: a size x size canvas with 7 instances), real arrays."""
  model, tx, schedule, config = build(name, dtype, remat)
  hw = (size, size)
  state_spec, batch_spec, _ = abstract_inputs(name, model, tx, config, hw, 1)
  rng = np.random.default_rng(0)
  state = jax.jit(lambda key: init_state(
      model, tx, key, (128, 128, 3) if "instances" in config else (*hw, 3)))(
          jax.random.PRNGKey(0))
  batch = {k: np.zeros(v.shape, v.dtype) for k, v in batch_spec.items()}
  batch["image"] = rng.normal(size=batch["image"].shape).astype(np.float32)
  if "label" in batch:
    batch["label"] = rng.integers(0, config.num_classes, batch["label"].shape).astype(np.int32)
  else:  # 7 boxes of a quarter of the canvas, box-shaped masks (crops all on)
    g = 7
    q = size // 4
    batch["image_size"][:] = size
    for j in range(g):
      x, y = rng.integers(0, size - q, 2)
      batch["boxes"][0, j] = batch["mask_boxes"][0, j] = (x, y, x + q, y + q)
      batch["mask_crops"][0, j] = 255
    batch["classes"][0, :g] = rng.integers(1, config.num_classes, g)
    batch["valid"][0, :g] = True
  key = jax.random.PRNGKey(1)
  compiled = jax.jit(step_fn(name, model, tx, schedule, config),
                     donate_argnums=0).lower(state, batch, key).compile(KEEP_REMAT)
  holder = {"state": state}

  def once():
    holder["state"], out = compiled(holder["state"], batch, key)
    jax.block_until_ready(out["loss"])

  return dict(model=name, input=f"{size}x{size}", batch=1, dtype=dtype, remat=remat,
              step_s=median_time(once, runs, 1))


MEMORY_COLUMNS = ("model", "input", "batch", "dtype", "remat", "params_m", "arguments_gib",
                  "temp_gib", "peak_gib", "compile_s")
TIME_COLUMNS = ("model", "input", "batch", "dtype", "remat", "step_s")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default=",".join(PLAN),
                      help=f"comma-separated, of {', '.join(PLAN)}")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--no-remat", action="store_true", help="only remat=False rows")
  parser.add_argument("--time", action="store_true",
                      help="time the step on this CPU at --time-size instead")
  parser.add_argument("--time-size", type=int, default=128)
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--out", help="write the rows as JSON here")
  args = parser.parse_args(argv)
  names = args.models.split(",")
  dtypes = args.dtypes.split(",")
  remats = (False,) if args.no_remat else (False, True)
  columns = TIME_COLUMNS if args.time else MEMORY_COLUMNS
  print(f"{'CPU step time' if args.time else 'XLA memory analysis'}, "
        f"{jax.devices()[0].device_kind}")
  print(" | ".join(columns), flush=True)
  rows = []
  for name in names:
    for dtype in dtypes:
      for remat in remats:
        row = (time_row(name, dtype, remat, args.time_size, args.runs) if args.time
               else memory_row(name, dtype, remat))
        rows.append(row)
        print(" | ".join(fmt(row.get(k)) for k in columns), flush=True)
  write_rows(args.out, args, rows)
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
