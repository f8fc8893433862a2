"""What every benchmark here shares: timing, peak FLOP/s for MFU, memory, printing.

The benchmark scripts run as `python benchmarks/<name>.py`, which puts this
folder on sys.path, so they `import timing`.
"""
import importlib
import resource
import statistics
import sys
import time

# torchvision (where installed) loads before TensorFlow, which segjax's input
# pipeline imports: loaded after it, torchvision's LLVM options clash with
# TensorFlow's and the process dies (bench_models.py did, at its first
# torchvision row). So the benchmarks that compare against PyTorch import
# this module before segjax; where TensorFlow came first, loading it here
# would be that crash, so it is left to the benchmark that needs it.
if "tensorflow" not in sys.modules:
  for _module in ("torch", "torchvision"):
    try:
      importlib.import_module(_module)
    except ImportError:
      pass

import jax  # noqa: E402

# Dense peak FLOP/s per device, for MFU (bfloat16 / float32 tensor-core rates).
PEAK_FLOPS = {
    "H100": {"bfloat16": 989e12, "float32": 494e12},  # fp32 via TF32
    "H200": {"bfloat16": 989e12, "float32": 494e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5": {"bfloat16": 197e12, "float32": 197e12},
}


# Set (FLOP/s) to use instead of PEAK_FLOPS, e.g. by accelerator.py's
# --peak-tflops for a device not in the table or a clock-limited one.
PEAK_OVERRIDE = None


def peak_flops(device, dtype):
  """The device's dense peak FLOP/s for `dtype` ("float32"/"bfloat16"), or None."""
  if PEAK_OVERRIDE:
    return PEAK_OVERRIDE
  for name, peaks in PEAK_FLOPS.items():
    if name.lower() in device.device_kind.lower():
      return peaks[dtype]
  return None


def median_time(fn, runs, warmup=1):
  """Median wall seconds of `fn()` over `runs` calls after `warmup` calls.

  `fn` must block until its work is done (jax.block_until_ready).
  """
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def compile_jax(f, *args, **jit_kwargs):
  """(compiled, compile seconds, GFLOPs from XLA's cost analysis) of jit(f)(*args)."""
  start = time.perf_counter()
  compiled = jax.jit(f, **jit_kwargs).lower(*args).compile()
  seconds = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  gflops = float(cost.get("flops", 0.0)) / 1e9 if cost else 0.0
  return compiled, seconds, gflops


def peak_memory_mb():
  """(MiB, what it measures): the accelerator allocator's peak, else peak RSS."""
  device = jax.devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**20, "device peak"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


def fmt(value):
  """A table cell: 4 significant digits for floats, '-' for None."""
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def write_rows(path, args, rows):
  """The benchmark's arguments, device and rows as JSON at `path` (if given)."""
  if path:
    import json
    with open(path, "w") as f:
      json.dump(dict(args=vars(args), device=jax.devices()[0].device_kind, rows=rows), f,
                indent=1)
