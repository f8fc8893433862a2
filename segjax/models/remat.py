"""Rematerialisation (gradient checkpointing) as a model option.

With `remat=True` a model wraps each of its repeated blocks (a ResNet
Bottleneck, a MiT or ViT transformer block, a U-Net double conv) in
`flax.linen.remat`: the forward pass keeps only each block's input, and the
backward pass recomputes the block's inner activations from it. Peak memory
of a train step then grows with the number of blocks rather than with every
intermediate activation, for about one extra forward pass of the blocks.

Param and batch-stat trees, names, outputs and gradients are the same with
and without it (tests/models/test_remat.py), so checkpoints move freely
between the two; only the compiled program differs. Inference does not
differentiate, so there it changes nothing. benchmarks/bench_memory.py
measures what it saves and costs per model.

XLA:CPU drops the optimisation barriers that jax.checkpoint places around
the recomputation (its `cse_barrier_expander` pass), after which common
subexpression elimination merges the recomputed forward pass with the
original one: on CPU remat then saves nothing, unless the program is
compiled with `KEEP_REMAT`, as GPU and TPU compilers keep the barriers
anyway. `segjax train` compiles its step with it whenever the model has
`remat` set (jit mode; jax.pmap takes no compiler options), and
`jax.jit(f).lower(*args).compile(KEEP_REMAT)` does it for one program, as
the benchmarks do to see on CPU what an accelerator would hold.
"""
import flax.linen as nn

# Compiler options under which XLA:CPU honours remat as GPU and TPU do.
KEEP_REMAT = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def maybe_remat(block, remat: bool, train_arg: bool = False):
  """`block` (a Module class) wrapped in nn.remat if `remat`, else itself.

  Args:
    block: the Module class of a repeated block.
    remat: the model's `remat` option.
    train_arg: the block is called as block(x, train) with a Python bool
      `train`, which must stay static under remat (it picks BatchNorm's and
      dropout's modes while tracing). flax counts `self` as argument 0.
  """
  if not remat:
    return block
  return nn.remat(block, static_argnums=(2,) if train_arg else ())
