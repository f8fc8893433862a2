"""The `segjax` command: train, eval, predict.

    segjax train   --config configs/unet_shapes.py --workdir workdir/unet [--config.train.steps=100]
    segjax eval    --workdir workdir/unet [--split test]
    segjax predict --workdir workdir/unet --output out/ image1.png image2.jpg
    segjax convert --config configs/deeplab_v3_resnet50_voc.py --weights resnet50.pth --output init/

`eval` and `predict` read the run's <workdir>/config.json unless --config is
given. Mistakes a user can make (paths, config keys, data, checkpoints) end
with one message on stderr and exit status 2; nothing already saved is lost.
"""
import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # Before TensorFlow loads.

from segjax.errors import CheckpointError, ConfigError, SegjaxError  # noqa: E402


def _parser():
  parser = argparse.ArgumentParser(
      prog="segjax", description="Semantic and instance segmentation in JAX.",
      epilog="Override any config key with --config.KEY=VALUE, e.g. "
             "--config.train.steps=100.")
  sub = parser.add_subparsers(dest="command", required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--config", help="configs/<model>_<dataset>.py "
                      "(default for eval/predict: <workdir>/config.json)")
  common.add_argument("--workdir", help="run directory: config.json, "
                      "metrics.jsonl, checkpoints/, tensorboard/")
  common.add_argument("--coordinator_address", help="host:port of process 0 "
                      "(multi-host; auto-detected on TPU pods and SLURM)")
  common.add_argument("--num_processes", type=int)
  common.add_argument("--process_id", type=int)
  sub.add_parser("train", parents=[common], help="train (or resume) a model")
  ev = sub.add_parser("eval", parents=[common], help="evaluate a checkpoint")
  ev.add_argument("--split", help="split to evaluate (default: eval.split)")
  ev.add_argument("--step", type=int, help="checkpoint step (default: newest)")
  pr = sub.add_parser("predict", parents=[common],
                      help="colour-coded masks and overlays (detectors: boxes, labels and, "
                      "where the model has them, instance masks) for image files")
  pr.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
  pr.add_argument("--output", required=True, help="directory for the PNGs")
  pr.add_argument("--step", type=int, help="checkpoint step (default: newest)")
  cv = sub.add_parser("convert", parents=[common],
                      help="PyTorch weights -> a checkpoint for config.init_from")
  cv.add_argument("--weights", required=True,
                  help="state dict file: .pth/.pt/.bin (needs torch), .safetensors, .npz")
  cv.add_argument("--output", required=True,
                  help="directory to write (pass it as --config.init_from)")
  cv.add_argument("--model", help="registry name (default: the config's model)")
  cv.add_argument("--num_classes", type=int, help="default: the config's num_classes")
  return parser


def _split_overrides(argv):
  """Separates `--config.a.b=v` / `--config.a.b v` from the other arguments."""
  rest, overrides = [], []
  args = iter(argv)
  for arg in args:
    if arg.startswith("--config."):
      if "=" not in arg:
        value = next(args, None)
        if value is None:
          raise ConfigError(f"{arg} has no value; write {arg}=VALUE")
        arg = f"{arg}={value}"
      overrides.append(arg[len("--config."):])
    else:
      rest.append(arg)
  return rest, overrides


def _load(args, overrides, need_workdir=True):
  from segjax import config as config_lib
  if need_workdir and not args.workdir:
    raise ConfigError("--workdir is required: the directory of the run")
  path = args.config
  if path is None:
    path = os.path.join(args.workdir or "", "config.json")
    if not os.path.isfile(path):
      raise ConfigError(f"no --config given and {path} does not exist; pass "
                        "--config configs/<file>.py or the workdir of a run")
  return config_lib.load_config(path, overrides)


def cmd_train(args, overrides):
  from segjax.train import loop
  loop.train(_load(args, overrides), args.workdir)


def cmd_eval(args, overrides):
  """The task's scores of a checkpoint with the config's eval protocol,
  written to metrics.jsonl as training writes its evaluations."""
  from segjax.train import loop
  from segjax.train.logger import MetricsWriter
  config = _load(args, overrides)
  with loop.Trainer(config, args.workdir) as trainer:
    state, step = _restore(trainer, args.step)
    split = args.split or config.eval.split
    if _primary():
      print(f"evaluating {split} at step {step}: {trainer.task.describe_eval()}",
            flush=True)
    result = trainer.evaluate(state, split, progress=_every_50)
    MetricsWriter(args.workdir, _primary(), tensorboard=False).write(step, split, result)
    if _primary():
      print(f"{split} at step {step}: {trainer.task.summary_line(result)}")
      for line in trainer.task.report(result):
        print(line)


def _every_50(examples):
  """Passes `examples` through, printing a count every 50 (long evaluations)."""
  count = 0
  for count, example in enumerate(examples, 1):
    if count % 50 == 0 and _primary():
      print(f"  {count} images", flush=True)
    yield example
  if _primary():
    print(f"  {count} images scored", flush=True)


def _restore(trainer, step):
  if step is not None:
    latest = trainer.checkpoints.all_steps()
    if step not in latest:
      raise CheckpointError(f"no checkpoint for step {step} in "
                            f"{trainer.checkpoints.directory}; available: {latest or 'none'}")
  if not trainer.checkpoints.all_steps():
    raise CheckpointError(f"no checkpoint in {trainer.checkpoints.directory}; train "
                          "first (segjax train) or pass the --workdir of a trained run")
  state, restored_step = trainer.initial_state(step=step)
  return state, restored_step


def cmd_predict(args, overrides):
  from segjax.train import loop
  config = _load(args, overrides)
  with loop.Trainer(config, args.workdir) as trainer:
    state, step = _restore(trainer, args.step)
    written = trainer.task.predict_files(trainer.variables(state), args.images, args.output)
  print(f"wrote {len(written)} files for {len(args.images)} image(s) to "
        f"{args.output} (checkpoint step {step})")


def cmd_convert(args, overrides):
  import jax
  import numpy as np
  from segjax import weights
  if args.config:
    config = _load(args, overrides, need_workdir=False)
    model = args.model or config.model
    kwargs = dict(config.model_kwargs) if model == config.model else {}
    num_classes = args.num_classes or config.num_classes
  elif args.model and args.num_classes:
    model, kwargs, num_classes = args.model, {}, args.num_classes
  else:
    raise ConfigError("segjax convert needs --config (the experiment to initialise) or "
                      "both --model and --num_classes")
  state_dict = weights.load_state_dict(args.weights)
  variables = weights.init_checkpoint(model, state_dict, num_classes, kwargs)
  where = weights.write_checkpoint(variables, args.output)
  count = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(variables))
  print(f"converted {len(state_dict)} tensors of {args.weights} into {model!r} "
        f"({count / 1e6:.1f}M values) at {where}; train with --config.init_from={args.output}")


def _primary():
  import jax
  return jax.process_index() == 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict,
            "convert": cmd_convert}


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  try:
    rest, overrides = _split_overrides(argv)
    args = _parser().parse_args(rest)
    from segjax.train import parallel
    parallel.initialize_distributed(args.coordinator_address, args.num_processes,
                                    args.process_id)
    COMMANDS[args.command](args, overrides)
  except SegjaxError as e:
    print(f"segjax {argv[0] if argv else ''}: error: {e}", file=sys.stderr)
    return e.exit_code
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
