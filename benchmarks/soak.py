"""Soak test: a long multi-process CPU run keeps host memory flat and leaves
nothing behind (not run in CI).

    python benchmarks/soak.py                       # 2 processes x 2 devices, 3000 steps
    python benchmarks/soak.py --steps 500 --interval 2 --out soak.json

Runs `segjax train` (configs/unet_shapes.py:tiny on segjax_shapes/small) as
--processes processes of --devices CPU devices each, joined through
jax.distributed, with evaluation every --eval_every and checkpoints every
--checkpoint_every steps. Every --interval seconds it prints the step and each
process's resident memory (VmRSS). Verdict, printed at the end and written
with the samples to --out:

  memory    median RSS over the last 10 % of the run vs over 20-30 % (after
            warm-up: compilation, first evaluation, first checkpoint) grows
            by less than --max_growth (default 10 %) in every process
  exit      every process exits 0 and the final checkpoint exists
  processes no process started by the run is still alive afterwards
  temp      no unfinished checkpoint write (*.orbax-checkpoint-tmp*) and the
            processes' private TMPDIR is empty
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "unet_shapes.py:tiny")


def rss_mb(pid):
  """Resident memory of process `pid` in MB, or None once it has exited."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 1024
  except (FileNotFoundError, ProcessLookupError):
    return None
  return None


def last_train_step(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  step = 0
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if row.get("split") == "train":
        step = max(step, row["step"])
  return step


def survivors(marker):
  """PIDs of live processes whose command line mentions `marker`."""
  found = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        if marker.encode() in f.read():
          found.append(int(pid))
    except OSError:
      continue
  return found


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(args, workdir, private_tmp):
  env = dict(os.environ, TMPDIR=private_tmp, TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}")
  common = [sys.executable, "-m", "segjax", "train", "--config", CONFIG,
            "--workdir", workdir, "--config.dataset=segjax_shapes/small",
            f"--config.data_dir={args.data_dir}", f"--config.train.steps={args.steps}",
            f"--config.train.log_every_steps={args.log_every}",
            f"--config.eval.every_steps={args.eval_every}",
            f"--config.checkpoint.every_steps={args.checkpoint_every}"]
  if args.processes > 1:
    port = free_port()
    common += [f"--coordinator_address=127.0.0.1:{port}",
               f"--num_processes={args.processes}"]
  logs = [open(os.path.join(workdir + ".logs", f"process_{i}.log"), "w")
          for i in range(args.processes)]
  processes = [subprocess.Popen(
      common + ([f"--process_id={i}"] if args.processes > 1 else []), env=env, cwd=REPO,
      stdout=logs[i], stderr=subprocess.STDOUT) for i in range(args.processes)]
  return processes, logs


def growth(samples, index, run_steps):
  """Relative RSS growth of process `index`: last 10 % of steps vs 20-30 %."""
  window = lambda lo, hi: [s["rss_mb"][index] for s in samples
                           if lo * run_steps <= s["step"] <= hi * run_steps
                           and s["rss_mb"][index] is not None]
  warm, late = window(0.2, 0.3), window(0.9, 1.0)
  if not warm or not late:
    return None
  return statistics.median(late) / statistics.median(warm) - 1


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=3000)
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--devices", type=int, default=2, help="CPU devices per process")
  parser.add_argument("--eval_every", type=int, default=250)
  parser.add_argument("--checkpoint_every", type=int, default=200)
  parser.add_argument("--log_every", type=int, default=50)
  parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
  parser.add_argument("--max_growth", type=float, default=0.10)
  parser.add_argument("--workdir", help="default: a fresh temporary directory")
  parser.add_argument("--data_dir", help="tfds data dir (default: inside the workdir)")
  parser.add_argument("--out", help="write samples and verdict as JSON here")
  args = parser.parse_args(argv)

  root = args.workdir or tempfile.mkdtemp(prefix="segjax_soak_")
  workdir = os.path.join(root, "run")
  private_tmp = os.path.join(root, "tmp")
  for d in (workdir + ".logs", private_tmp):
    os.makedirs(d, exist_ok=True)
  args.data_dir = args.data_dir or os.path.join(root, "tfds")
  from segjax.data.builders import load_builder  # prepares the data once, up front
  load_builder("segjax_shapes/small", args.data_dir)

  print(f"soak: {args.processes} process(es) x {args.devices} CPU devices, "
        f"{args.steps} steps, eval every {args.eval_every}, checkpoint every "
        f"{args.checkpoint_every}; workdir {workdir}", flush=True)
  print("elapsed_s | step | " + " | ".join(f"rss_mb[{i}]" for i in range(args.processes)),
        flush=True)
  started = time.time()
  processes, logs = launch(args, workdir, private_tmp)
  samples = []
  try:
    while any(p.poll() is None for p in processes):
      sample = dict(elapsed_s=round(time.time() - started, 1),
                    step=last_train_step(workdir), rss_mb=[rss_mb(p.pid) for p in processes])
      samples.append(sample)
      print(f"{sample['elapsed_s']:9.1f} | {sample['step']:5d} | " + " | ".join(
          "-" if r is None else f"{r:8.1f}" for r in sample["rss_mb"]), flush=True)
      time.sleep(args.interval)
  finally:  # Interrupted: take the training processes down too (SIGTERM
    for p in processes:  # would only make them save and stop).
      if p.poll() is None:
        p.kill()
    for log in logs:
      log.close()

  time.sleep(1.0)  # let any orphaned child show itself
  checks = {}
  growths = [growth(samples, i, args.steps) for i in range(args.processes)]
  checks["memory"] = all(g is not None and g < args.max_growth for g in growths)
  codes = [p.returncode for p in processes]
  checks["exit"] = all(c == 0 for c in codes) and os.path.isdir(
      os.path.join(workdir, "checkpoints", str(args.steps)))
  stray = survivors(workdir)
  checks["processes"] = not stray
  unfinished = [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in d] \
      if os.path.isdir(os.path.join(workdir, "checkpoints")) else []
  leftovers = os.listdir(private_tmp)
  checks["temp"] = not unfinished and not leftovers
  verdict = dict(
      passed=all(checks.values()), checks=checks, exit_codes=codes,
      rss_growth=[None if g is None else round(g, 4) for g in growths],
      rss_mb_first=samples[0]["rss_mb"] if samples else None,
      rss_mb_peak=[max((s["rss_mb"][i] or 0) for s in samples) for i in range(args.processes)],
      stray_pids=stray, unfinished_checkpoints=unfinished, temp_leftovers=leftovers[:20],
      wall_s=round(time.time() - started, 1))
  print(f"\nverdict: {'PASS' if verdict['passed'] else 'FAIL'}")
  for key, value in verdict.items():
    if key != "passed":
      print(f"  {key}: {value}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(args=vars(args), samples=samples, verdict=verdict), f, indent=1)
  if not args.workdir and verdict["passed"]:
    shutil.rmtree(root, ignore_errors=True)
  return 0 if verdict["passed"] else 1


if __name__ == "__main__":
  sys.exit(main())
