"""U-Net train-step benchmark: segjax (jit) against the same model in PyTorch.

    python benchmarks/bench_train.py                      # 256x256, batch 8, width 32
    python benchmarks/bench_train.py --dtype bfloat16 --batch 32 --out bench_train.json

Times the compiled SGD train step (forward, backward, update) after a warm-up,
`block_until_ready` on every step, median of --steps runs. Reports images/s,
step time, compile seconds, GFLOPs per step (XLA cost analysis), peak memory
(device allocator on GPU/TPU, process peak RSS on CPU) and, on an accelerator
with a known peak, MFU. When torch is importable the same U-Net (same widths,
BN, 2x2 transposed convs) is timed in PyTorch in the same run (channels_last,
and torch.compile on GPU) and the ratio printed.
"""
import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

# timing first: it loads torchvision before segjax loads TensorFlow.
from timing import fmt, median_time, peak_flops, peak_memory_mb
from segjax import losses, models
from segjax.tasks import semantic
from segjax.train import optim, parallel, steps
from segjax.train.state import init_state


def bench_segjax(args):
  par = parallel.Parallel("jit", parallel.make_mesh())
  model = models.build("unet", args.classes, depth=args.depth, base_width=args.width,
                       dtype=getattr(jnp, args.dtype))
  opt = ml_collections.ConfigDict(dict(
      name="sgd", learning_rate=0.01, schedule="constant", warmup_steps=0,
      weight_decay=0.0, momentum=0.9, grad_clip_norm=0.0))
  tx, schedule = optim.make_optimizer(opt, 1000)
  state = par.put_state(jax.device_get(init_state(
      model, tx, jax.random.PRNGKey(0), (args.size, args.size, 3))))
  rng = np.random.default_rng(0)
  batch = par.put_batch({
      "image": rng.normal(size=(args.batch, args.size, args.size, 3)).astype(np.float32),
      "label": rng.integers(0, args.classes, (args.batch, args.size, args.size)).astype(np.int32)})
  key = par.put_replicated(jax.random.PRNGKey(1))
  train = par.compile(steps.train_step, donate_first=True, model=model, tx=tx,
                      objective=semantic.make_objective(losses.make_loss("cross_entropy")),
                      schedule=schedule)
  start = time.perf_counter()
  compiled = train.lower(state, batch, key).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  holder = {"state": state}

  def step():
    holder["state"], m = compiled(holder["state"], batch, key)
    jax.block_until_ready(m["loss"])

  seconds = median_time(step, args.steps, args.warmup)
  device = jax.devices()[0]
  peak_mb, memory_kind = peak_memory_mb()
  peak = peak_flops(device, args.dtype)
  n = jax.device_count()
  return dict(
      framework="segjax (jax.jit)", device=device.device_kind, devices=n,
      step_s=seconds, images_per_sec=args.batch / seconds, compile_s=compile_s,
      gflops_per_step=flops / 1e9, peak_memory_mb=peak_mb, memory_kind=memory_kind,
      mfu=(flops / seconds / (peak * n)) if (peak and flops) else None)


def _torch_unet(torch, args):
  nn = torch.nn

  def double(cin, cout):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))

  class UNet(nn.Module):
    def __init__(self):
      super().__init__()
      w = [args.width * 2**i for i in range(args.depth + 1)]
      self.down = nn.ModuleList([double(3 if i == 0 else w[i - 1], w[i])
                                 for i in range(args.depth)])
      self.bottom = double(w[-2], w[-1])
      self.up = nn.ModuleList([nn.ConvTranspose2d(w[i + 1], w[i], 2, 2)
                               for i in range(args.depth)])
      self.dec = nn.ModuleList([double(2 * w[i], w[i]) for i in range(args.depth)])
      self.head = nn.Conv2d(w[0], args.classes, 1)

    def forward(self, x):
      skips = []
      for block in self.down:
        x = block(x)
        skips.append(x)
        x = nn.functional.max_pool2d(x, 2)
      x = self.bottom(x)
      for i in reversed(range(args.depth)):
        x = self.dec[i](torch.cat([skips[i], self.up[i](x)], 1))
      return self.head(x)

  return UNet()


def bench_torch(args):
  try:
    import torch
  except ImportError:
    return None
  gpu = torch.cuda.is_available()
  device = torch.device("cuda" if gpu else "cpu")
  model = _torch_unet(torch, args).to(device).to(memory_format=torch.channels_last)
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
  image = torch.randn(args.batch, 3, args.size, args.size, device=device).to(
      memory_format=torch.channels_last)
  label = torch.randint(0, args.classes, (args.batch, args.size, args.size), device=device)
  dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
  step_model = torch.compile(model) if gpu else model

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
      loss = torch.nn.functional.cross_entropy(step_model(image).float(), label)
    loss.backward()
    opt.step()
    if gpu:
      torch.cuda.synchronize()

  start = time.perf_counter()
  step()
  compile_s = time.perf_counter() - start
  seconds = median_time(step, args.steps, args.warmup)
  return dict(framework=f"PyTorch {torch.__version__} (channels_last"
              f"{', torch.compile' if gpu else ''})",
              device=torch.cuda.get_device_name() if gpu else "cpu", devices=1,
              step_s=seconds, images_per_sec=args.batch / seconds,
              compile_s=compile_s,
              peak_memory_mb=(torch.cuda.max_memory_allocated() / 2**20 if gpu else None))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--width", type=int, default=32)
  parser.add_argument("--depth", type=int, default=4)
  parser.add_argument("--classes", type=int, default=4)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--out", help="write the results as JSON here")
  args = parser.parse_args(argv)
  rows = [bench_segjax(args)]
  if not args.no_torch:
    torch_row = bench_torch(args)
    if torch_row:
      rows.append(torch_row)
  print(f"U-Net train step, {args.size}x{args.size}, batch {args.batch}, width "
        f"{args.width}, depth {args.depth}, {args.dtype}, median of {args.steps}")
  header = ("framework", "device", "step_s", "images_per_sec", "compile_s",
            "gflops_per_step", "peak_memory_mb", "mfu")
  print(" | ".join(header))
  for row in rows:
    print(" | ".join(fmt(row.get(k)) for k in header))
  if len(rows) == 2:
    ratio = rows[1]["step_s"] / rows[0]["step_s"]
    print(f"PyTorch step time / segjax step time: {ratio:.2f} "
          f"(> 1: segjax is faster)")
    rows[0]["torch_ratio"] = ratio
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(args=vars(args), results=rows), f, indent=2)
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
