"""tfds -> tf.data streams of host-local batches, for any kind of example.

The semantic (segjax.data.pipeline) and instance (segjax.data.instances)
inputs differ only in how an example is decoded and transformed; both read
the dataset through the two streams here.

Training stream. The split is cut into `S` shards with `tfds.even_splits`
(S = `data.num_shards`, default one per process, which is exactly
`tfds.split_for_jax_process`). Each host reads its S/P shards. Each shard is
an endless sequence of epochs, each epoch a fresh shuffle seeded by
(seed, shard, epoch); example number i of a shard's sequence is augmented with
the stateless seed (seed, shard, i). The global batch of step t is the
concatenation over shards of the examples t*b ... t*b+b-1 (b = B/S) of each
shard. Hence:
  * the stream is a pure function of (seed, step): a run restarted at step k
    skips straight to epoch k*b // n and position k*b % n in it and sees
    the same batches as a run that never stopped;
  * with a fixed S the batches do not depend on how many hosts read them, so
    2 processes x 2 devices train exactly like 1 process x 4 devices.

Grouped streams (a `groups.Grouping`, e.g. Mask R-CNN's orientations): every
batch holds one group. Each shard is cut into one sequence per group, each
the stream above over that group's examples only (its own shuffles and
seeds); the step's group comes from `groups.Deck`, a pure function of
(seed, step) that keeps the split's proportions, and every shard gives b
examples of it. Both properties above hold: a restart at step k starts each
group's sequence after the batches the deck gave it before k. Every shard
must hold examples of every group the split has.

Evaluation. Each host reads `tfds.split_for_jax_process(split)`, so each
example is read by exactly one host. Semantic evaluation takes the examples
one by one at their own size (segjax.data.pipeline.eval_examples, scored by
segjax.evaluation); detector evaluation batches them on a fixed canvas
(`evaluation_stream`), padding each host's part with masked-out examples to
the same number of batches as every other host, each batch carrying `mask`
[B] (1 = real). Grouped, a host yields each group's batches in turn, padded
per group to the same number of batches as every other host, so every host
meets the same sequence of shapes.
"""
import math

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from segjax.config import option
from segjax.data import groups
from segjax.data.builders import load_builder
from segjax.errors import ConfigError, DataError

# Offsets that keep the shuffle and augmentation seed streams apart.
_SHUFFLE_SALT, _AUGMENT_SALT = 0x5EED, 0xA46


def process(process_index=None, process_count=None) -> tuple[int, int]:
  """(process_index, process_count), JAX's where an argument is None."""
  import jax
  return (jax.process_index() if process_index is None else process_index,
          jax.process_count() if process_count is None else process_count)


def builder(config):
  """The config's prepared dataset; `data.skip_bad_examples` applies while it
  is first prepared from a manual download or a folder."""
  skip = bool(option(config.data, "data", "skip_bad_examples"))
  return load_builder(config.dataset, config.data_dir,
                      **({"skip_bad_examples": True} if skip else {}))


def num_examples(dataset_builder, split) -> int:
  """Examples in `split`; DataError naming the splits if there is none."""
  try:
    return dataset_builder.info.splits[split].num_examples
  except (KeyError, ValueError) as e:
    raise DataError(f"dataset {dataset_builder.name} has no split {split!r} "
                    f"(its splits: {', '.join(dataset_builder.info.splits.keys())}); "
                    "set eval.split or the training split in the config") from e


def training_stream(config, decode, augment, start_step=0, process_index=None,
                    process_count=None, split="train", grouping=None):
  """This host's training batches from `start_step` on, as a tf.data.Dataset
  (the stream of the module docstring; also used for instance data).

  Args:
    decode: tfds example -> example, applied once per example (cached for
      splits below `data.cache_below` examples).
    augment: (seed int64 [2], example) -> example of fixed shapes; the seed
      is (seed, shard, index in the shard's sequence). With `grouping`, a
      sequence of them, one per group (each group its own shapes).
    grouping: None (one stream), or a groups.Grouping: every batch holds
      examples of one group.
  """
  index, count = process(process_index, process_count)
  num_shards = option(config.data, "data", "num_shards") or count
  batch = config.train.batch_size
  if num_shards % count or batch % num_shards:
    raise ConfigError(
        f"data.num_shards={num_shards} must be a multiple of the number of "
        f"processes ({count}) and divide train.batch_size={batch}")
  per_shard = batch // num_shards
  dataset_builder = builder(config)
  shards_per_host = num_shards // count
  host_shards = range(index * shards_per_host, (index + 1) * shards_per_host)
  splits = tfds.even_splits(split, n=num_shards, drop_remainder=False)
  if grouping is None:
    ds = _joined([_shard_stream(config, dataset_builder, splits[s], s, per_shard,
                                start_step, decode, augment)
                  for s in host_shards])
  else:
    ds = _grouped_stream(config, dataset_builder, splits, host_shards, per_shard,
                         start_step, decode, augment, grouping)
  return ds.prefetch(option(config.data, "data", "prefetch"))


def _joined(shards):
  """One host batch from the shards' parts, in shard order."""
  return tf.data.Dataset.zip(tuple(shards)).map(
      lambda *parts: {k: tf.concat([p[k] for p in parts], 0) for k in parts[0]})


def _grouped_stream(config, dataset_builder, splits, host_shards, per_shard,
                    start_step, decode, augments, grouping):
  """The grouped stream of the module docstring: per group, the host's
  shards joined; the deck picks the group of each step."""
  # Every shard's membership, not only this host's: the deck needs the
  # split's counts, the same on every host.
  members = [grouping.members(dataset_builder, s) for s in splits]
  counts = np.bincount(np.concatenate(members), minlength=grouping.count)
  deck = groups.Deck(config.seed, counts)
  before = deck.steps_before(start_step)
  per_group = []
  for g in map(int, np.flatnonzero(counts)):  # An empty group is never dealt.
    for s in host_shards:
      if not (members[s] == g).any():
        raise DataError(
            f"shard {s} of {len(splits)} of the training split of "
            f"{dataset_builder.name} has no {grouping.names[g]} images, which "
            "other shards have, so it cannot fill that group's batches; lower "
            "data.num_shards")
    # Stream ids shard + S * g: group 0 keeps the ungrouped stream's seeds.
    per_group.append(_joined([
        _shard_stream(config, dataset_builder, splits[s], s + len(splits) * g,
                      per_shard, int(before[g]), decode, augments[g],
                      member=members[s] == g)
        for s in host_shards]))
  slot = tf.constant(np.cumsum(counts > 0) - 1, tf.int64)  # group -> its stream
  choice = tf.data.Dataset.range(start_step, 2**62).map(
      lambda step: tf.gather(slot, deck.group(step)))
  return tf.data.Dataset.choose_from_datasets(per_group, choice)


def _shard_stream(config, dataset_builder, split, stream, per_shard, first_batch,
                  decode, augment, member=None):
  """One shard's endless sequence of example batches from its batch
  `first_batch` on; `stream` seeds its shuffles and augmentation, `member`
  (bool [n], the shard's examples in read order) keeps only some examples."""
  n = num_examples(dataset_builder, split)
  if n == 0:
    raise DataError(f"training split {split!r} of {dataset_builder.name} is empty; "
                    "check the dataset files or the data_dir")
  read_config = tfds.ReadConfig(try_autocache=False)
  if member is None:
    base = dataset_builder.as_dataset(split=split, shuffle_files=False,
                                      read_config=read_config)
  else:
    base = groups.members_only(dataset_builder, split, member, read_config=read_config)
    n = int(member.sum())
  base = base.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
  if n <= option(config.data, "data", "cache_below"):
    base = base.cache()  # Small splits: decode once, not every epoch.
  buffer = min(n, option(config.data, "data", "shuffle_buffer"))
  seed = config.seed

  def epoch(e):
    shuffle_seed = (seed * 1_000_003 + stream) * 1_000_003 + e + _SHUFFLE_SALT
    return base.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)

  first = first_batch * per_shard
  first_epoch, offset = divmod(first, n)
  ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch).skip(offset)
  ds = ds.enumerate(start=first)

  def seeded(i, example):
    example_seed = tf.stack([tf.constant(seed * 7919 + stream + _AUGMENT_SALT, tf.int64), i])
    return augment(example_seed, example)

  ds = ds.map(seeded, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(per_shard, drop_remainder=True)


def evaluation_stream(config, prepare, blank, split=None, process_index=None,
                      process_count=None, local_devices=1, grouping=None):
  """This host's evaluation batches as a tf.data.Dataset (the stream of the
  module docstring; also used for instance data).

  Args:
    prepare: tfds example -> example with a "mask" of 1. With `grouping`, a
      sequence of them, one per group.
    blank: the prepared dataset -> one padding example (its "mask" 0), added
      so that every host yields the same number of batches.
    local_devices: the per-host batch, eval.batch_size / P, is rounded up to
      a multiple of this.
    grouping: None, or a groups.Grouping: each batch holds one group, the
      groups one after another.
  """
  index, count = process(process_index, process_count)
  split = split or config.eval.split
  dataset_builder = builder(config)
  host_splits = tfds.even_splits(split, n=count, drop_remainder=False)
  sizes = [num_examples(dataset_builder, s) for s in host_splits]
  if sum(sizes) == 0:
    raise DataError(f"evaluation split {split!r} of {dataset_builder.name} is empty; "
                    "check the dataset files or set eval.split")
  per_host = math.ceil(config.eval.batch_size / count / local_devices) * local_devices
  if grouping is not None:
    return _grouped_evaluation(dataset_builder, host_splits, index, per_host,
                               prepare, blank, grouping)
  host_split = tfds.split_for_jax_process(split, process_index=index,
                                          process_count=count)
  ds = dataset_builder.as_dataset(split=host_split, shuffle_files=False)
  return _padded_batches(ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE),
                         sizes, index, per_host, blank)


def _padded_batches(ds, sizes, index, per_host, blank):
  """Host `index`'s prepared examples `ds` (sizes[index] of them) in batches
  of per_host, padded with `blank` examples to as many batches as the host
  with the most (sizes: every host's count)."""
  num_batches = math.ceil(max(sizes) / per_host)
  padding = num_batches * per_host - sizes[index]
  if padding:
    ds = ds.concatenate(tf.data.Dataset.from_tensors(blank(ds)).repeat(padding))
  return ds.batch(per_host)


def _grouped_evaluation(dataset_builder, host_splits, index, per_host, prepare,
                        blank, grouping):
  """Each group's batches in turn; per group, every host pads its part to
  the batches of the host with the most (so each reads every host's sizes)."""
  members = [grouping.members(dataset_builder, s) for s in host_splits]
  parts = []
  for g in range(grouping.count):
    sizes = [int((m == g).sum()) for m in members]
    if not max(sizes):
      continue
    ds = groups.members_only(dataset_builder, host_splits[index], members[index] == g)
    parts.append(_padded_batches(ds.map(prepare[g], num_parallel_calls=tf.data.AUTOTUNE),
                                 sizes, index, per_host, blank))
  ds = parts[0]
  for part in parts[1:]:
    ds = ds.concatenate(part)
  return ds


def options() -> tf.data.Options:
  """The tf.data options every stream is read with."""
  result = tf.data.Options()
  result.deterministic = True  # parallel maps keep the order: resumable streams
  # tf.data's autotuning thread notices only late that its iterator is being
  # destroyed: a dropped training iterator took 12 s to free at the end of
  # every run. Without autotuning, AUTOTUNE parallelism is one call per core.
  result.autotune.enabled = False
  return result


def checked(ds, config, check):
  """Iterates `ds` as numpy batches, with `options()`, naming data errors.

  Args:
    check: (numpy batch, config) -> None; raises DataError for a bad batch
      (e.g. class ids beyond num_classes).

  Raises:
    DataError: for a graph-side check that failed, naming the dataset.
  """
  iterator = ds.with_options(options()).as_numpy_iterator()
  while True:
    try:
      host_batch = next(iterator)
    except StopIteration:
      return
    except tf.errors.InvalidArgumentError as e:  # Raised by checks in the graph.
      raise DataError(f"dataset {config.dataset}: {e.message.splitlines()[0]}") from e
    check(host_batch, config)
    yield host_batch


