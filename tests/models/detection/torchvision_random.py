"""Randomly initialised torchvision detectors for the parity tests, and how
their outputs are compared (test_maskrcnn_parity.py, test_fasterrcnn_parity.py).

Random values everywhere (FrozenBatchNorm2d statistics and affine params,
FPN and head weights and biases), so a swapped or transposed tensor shows.
"""
import math

import numpy as np
import torch


def relative_error(ours, theirs):
  """max |ours - theirs| / max |theirs|."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def nhwc(t):
  """A torch NCHW tensor -> numpy NHWC."""
  return t.detach().numpy().transpose(0, 2, 3, 1)


def freeze_bn(module, generator):
  """BatchNorm2d -> FrozenBatchNorm2d (checkpoint layout) with random values."""
  from torchvision.ops.misc import FrozenBatchNorm2d  # pylint: disable=import-outside-toplevel
  for name, child in module.named_children():
    if isinstance(child, torch.nn.BatchNorm2d):
      c = child.num_features
      frozen = FrozenBatchNorm2d(c)
      frozen.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
      frozen.running_var.copy_(0.5 + torch.rand(c, generator=generator))
      frozen.weight.copy_(0.5 + torch.rand(c, generator=generator))
      frozen.bias.copy_(0.1 * torch.randn(c, generator=generator))
      setattr(module, name, frozen)
    else:
      freeze_bn(child, generator)


def randomise_heads(net, generator):
  """FPN and heads: weights ~ N(0, 1 / fan-in), biases ~ N(0, 0.01)."""
  with torch.no_grad():
    for name, p in net.named_parameters():
      if name.startswith("backbone.body."):
        continue
      if name.endswith(".bias"):
        p.copy_(0.1 * torch.randn(p.shape, generator=generator))
      else:
        p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p[0].numel()))


def random_detector(builder, num_classes, **kwargs):
  """torchvision's `builder` (e.g. maskrcnn_resnet50_fpn) with random
  values, in eval mode, and a seeded generator for the inputs.

  The backbone's convs keep torchvision's init, drawn from the global
  generator: seeded, so the figures do not depend on which tests ran
  before in the process.
  """
  torch.set_num_threads(1)
  torch.manual_seed(0)
  generator = torch.Generator().manual_seed(0)
  net = builder(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
  freeze_bn(net.backbone.body, generator)
  randomise_heads(net, generator)
  return net.eval(), generator
