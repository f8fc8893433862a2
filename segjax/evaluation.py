"""Data-parallel evaluation of a semantic model, image by image.

The protocol is the config's `eval` block as `segjax.inference` runs it
(whole image, `resize_to`, sliding window, scales, flips), each image scored
against its label at its own size. The work is spread over every device:

  * each host reads its share of the split (`tfds.split_for_jax_process`),
    so every image is read by exactly one host;
  * an image is placed on its canvas (its sides rounded up to `eval.bucket`),
    and images wait in one group per canvas; a full group, `per_device`
    images for each of this host's devices, is one call in which every
    device scores its images one after another and the confusion matrices
    are summed over the devices;
  * at the end the partial groups are filled with blank images whose labels
    are all ignore (they count nothing), and the hosts' matrices are summed.

Confusion matrices are integer counts, and each image's counts come from the
same per-image program wherever it runs, so the result does not depend on
the number of devices or hosts, on the order of the images, or on how they
were grouped. A host needs no other host until the final sum: the calls run
on its own devices only, so hosts whose shares hold different canvases never
wait for each other. Compilations: one per canvas shape met.
"""
import math
from typing import Callable, Iterable, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from segjax import metrics
from segjax.errors import DataError
from segjax.inference import Segmenter

# The training mesh's axis name: on one host the scorer's mesh then equals
# the training mesh, and the replicated training state is used without a copy.
AXIS = "data"
# Device results are fetched and summed in int64 every this many calls
# (int32 counts of one class pair could overflow over a large split).
_FETCH_EVERY = 16

# One example: (name for error messages, normalised image float32 [H, W, 3],
# label int [H, W]).
Example = Tuple[str, np.ndarray, np.ndarray]


class ShardedScorer:
  """Scores images on `devices` (this process's) with one Segmenter."""

  def __init__(self, segmenter: Segmenter, num_classes: int,
               devices: Optional[Sequence[jax.Device]] = None, per_device: int = 1,
               ignore_index: int = 255):
    self.segmenter = segmenter
    self.num_classes = num_classes
    self.ignore_index = ignore_index
    self.devices = list(devices or jax.local_devices())
    self.per_device = max(int(per_device), 1)
    self.mesh = Mesh(np.asarray(self.devices), (AXIS,))
    # Real (not blank) images each device has scored, for the benchmarks.
    self.images_per_device = np.zeros(len(self.devices), np.int64)
    self._call = jax.jit(jax.shard_map(
        self._device_confusion, mesh=self.mesh,
        in_specs=(P(), P(AXIS), P(AXIS), P(AXIS)), out_specs=P()))

  @property
  def group_size(self) -> int:
    """Images per call: per_device for each device."""
    return self.per_device * len(self.devices)

  def _device_confusion(self, variables, canvases, valid, labels):
    """One device's images [b, Hc, Wc, 3], sizes [b, 2], labels [b, Hc, Wc]
    -> [K, K] int32 summed over every device's images."""
    def one(args):
      canvas, size, label = args
      return self.segmenter.canvas_confusion(variables, canvas[None], size, label[None],
                                             self.num_classes, self.ignore_index)
    # One image at a time: a device holds one image's activations, and each
    # image runs the same program whatever the group size.
    counts = jax.lax.map(one, (canvases, valid, labels)).sum(axis=0)
    return jax.lax.psum(counts, AXIS)

  def replicate(self, variables):
    """Model variables on every device of this scorer."""
    return jax.device_put(variables, NamedSharding(self.mesh, P()))

  def __call__(self, variables, examples: Iterable[Example]) -> np.ndarray:
    """Confusion matrix int64 [K, K] (rows ground truth) of `examples`.

    `variables` must come from `replicate`; labels are checked where the
    examples are read (segjax.data.pipeline.eval_examples).
    """
    groups = {}  # canvas shape -> list of (name, canvas, size, label canvas)
    pending, total = [], np.zeros((self.num_classes,) * 2, np.int64)
    for name, image, label in examples:
      canvas, size = self.segmenter.place(np.asarray(image, np.float32))
      labels, _ = self.segmenter.place(np.asarray(label, np.int32), fill=self.ignore_index)
      group = groups.setdefault(canvas.shape[1:3], [])
      group.append((name, canvas[0], size, labels[0]))
      if len(group) == self.group_size:
        pending.append(self._run(variables, groups.pop(canvas.shape[1:3])))
      if len(pending) == _FETCH_EVERY:
        total += _fetch(pending)
    for shape, group in groups.items():
      blank = ("blank", np.zeros((*shape, group[0][1].shape[-1]), np.float32),
               np.array(shape, np.int32), np.full(shape, self.ignore_index, np.int32))
      pending.append(self._run(variables, group + [blank] * (self.group_size - len(group))))
    return total + _fetch(pending)

  def _run(self, variables, group):
    names = [g[0] for g in group if g[0] != "blank"]
    real = np.array([g[0] != "blank" for g in group]).reshape(len(self.devices), -1)
    self.images_per_device += real.sum(axis=1)
    stacked = [np.stack([g[i] for g in group]) for i in (1, 2, 3)]
    try:
      return self._call(variables, *stacked)
    # A runtime failure (an image too large for the device's memory) names
    # its images; the cause stays attached. Anything else is a bug in
    # segjax, not in the data, and keeps its own traceback.
    except jax.errors.JaxRuntimeError as e:
      raise DataError(f"evaluation failed on image(s) {', '.join(names)}: "
                      f"{type(e).__name__}: {str(e).splitlines()[0]}") from e


def _fetch(pending) -> np.ndarray:
  total = sum(np.asarray(jax.device_get(x), np.int64) for x in pending)
  pending.clear()
  return total


def evaluate(scorer: ShardedScorer, variables, examples: Iterable[Example],
             progress: Optional[Callable] = None) -> dict:
  """`metrics.scores` of the examples of every host, plus "num_pixels".

  Every process must call it (the hosts' matrices are summed at the end).
  """
  if progress is not None:
    examples = progress(examples)
  confusion = scorer(scorer.replicate(variables), examples)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    confusion = np.asarray(multihost_utils.process_allgather(confusion)).sum(0)
  result = metrics.scores(confusion)
  result["num_pixels"] = int(confusion.sum())
  return result


def per_device_images(batch_size: int, num_devices: int) -> int:
  """Images each device scores per call for a global eval.batch_size."""
  return max(math.ceil(batch_size / num_devices), 1)
