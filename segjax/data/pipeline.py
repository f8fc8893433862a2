"""tfds -> tf.data -> host-local numpy batches (-> global jax.Arrays).

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

Evaluation stream. Each host reads `tfds.split_for_jax_process(split)`, pads
its part with masked-out examples to the same number of batches as every
other host, and each batch carries `mask` [B] (1 = real example), so each
example is counted exactly once on any number of hosts and devices.
"""
import math

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from segjax.data import transforms, weight_map
from segjax.config import option
from segjax.data.builders import load_builder
from segjax.errors import ConfigError, DataError

IGNORE = 255
# Offsets that keep the shuffle and augmentation seed streams apart.
_SHUFFLE_SALT, _AUGMENT_SALT = 0x5EED, 0xA46


def _process(process_index, process_count):
  import jax
  return (jax.process_index() if process_index is None else process_index,
          jax.process_count() if process_count is None else process_count)


def semantic_example(example):
  """tfds features -> {"image": uint8 [H,W,3], "label": int32 [H,W]}."""
  label = example["segmentation_mask"]
  if label.shape.rank == 3:
    label = label[..., 0]
  return {"image": example["image"], "label": tf.cast(label, tf.int32)}


def _builder(config):
  """The config's prepared dataset; `data.skip_bad_examples` applies while it
  is first prepared from a manual download or a folder."""
  skip = bool(option(config.data, "data", "skip_bad_examples"))
  return load_builder(config.dataset, config.data_dir,
                      **({"skip_bad_examples": True} if skip else {}))


def _num_examples(builder, split):
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError) as e:
    raise DataError(f"dataset {builder.name} has no split {split!r} "
                    f"(its splits: {', '.join(builder.info.splits.keys())}); set "
                    "eval.split or the training split in the config") from e


def train_batches(config, start_step=0, process_index=None, process_count=None,
                  split="train"):
  """Yields the host-local training batches of steps start_step, start_step+1, ...

  Args:
    config: the experiment config (dataset, data_dir, seed, image_size,
      train.batch_size, augment.*, data.*, loss.name).
    start_step: first step to produce (resuming skips without reading).

  Yields:
    dict of numpy arrays: "image" float32 [B/P, h, w, 3] normalised,
    "label" int32 [B/P, h, w] (255 = ignore), and "weight" float32 [B/P, h, w]
    when the loss is "unet_weighted".
  """
  crop = tuple(config.image_size)
  aug = config.augment
  weighted = config.loss.name == "unet_weighted"
  loss_kwargs = dict(config.loss.kwargs)

  def augment(example_seed, example):
    out = transforms.train_transform(
        example, example_seed, crop_size=crop, scale_range=tuple(aug.scale_range),
        flip=aug.flip, photometric=aug.photometric, mean=tuple(aug.mean),
        std=tuple(aug.std))
    if weighted:
      out["weight"] = _unet_weights(out["label"], loss_kwargs)
    return out

  ds = training_stream(config, semantic_example, augment, start_step=start_step,
                       process_index=process_index, process_count=process_count,
                       split=split)
  yield from _checked(ds, config)


def training_stream(config, decode, augment, start_step=0, process_index=None,
                    process_count=None, split="train"):
  """This host's training batches from `start_step` on, as a tf.data.Dataset
  (the stream of the module docstring; also used for instance data).

  Args:
    decode: tfds example -> example, applied once per example (cached for
      splits below `data.cache_below` examples).
    augment: (seed int64 [2], example) -> example of fixed shapes; the seed
      is (seed, shard, index in the shard's sequence).
  """
  index, count = _process(process_index, process_count)
  num_shards = option(config.data, "data", "num_shards") or count
  batch = config.train.batch_size
  if num_shards % count or batch % num_shards:
    raise ConfigError(
        f"data.num_shards={num_shards} must be a multiple of the number of "
        f"processes ({count}) and divide train.batch_size={batch}")
  per_shard = batch // num_shards
  builder = _builder(config)
  shards_per_host = num_shards // count
  host_shards = range(index * shards_per_host, (index + 1) * shards_per_host)
  splits = tfds.even_splits(split, n=num_shards, drop_remainder=False)
  streams = [_shard_stream(config, builder, splits[s], s, per_shard, start_step,
                           decode, augment)
             for s in host_shards]
  ds = tf.data.Dataset.zip(tuple(streams)).map(
      lambda *parts: {k: tf.concat([p[k] for p in parts], 0) for k in parts[0]})
  return ds.prefetch(option(config.data, "data", "prefetch"))


def _shard_stream(config, builder, split, shard, per_shard, start_step, decode,
                  augment):
  n = _num_examples(builder, split)
  if n == 0:
    raise DataError(f"training split {split!r} of {builder.name} is empty; "
                    "check the dataset files or the data_dir")
  base = builder.as_dataset(split=split, shuffle_files=False,
                            read_config=tfds.ReadConfig(try_autocache=False))
  base = base.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
  if n <= option(config.data, "data", "cache_below"):
    base = base.cache()  # Small splits: decode once, not every epoch.
  buffer = min(n, option(config.data, "data", "shuffle_buffer"))
  seed = config.seed

  def epoch(e):
    shuffle_seed = (seed * 1_000_003 + shard) * 1_000_003 + e + _SHUFFLE_SALT
    return base.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)

  first = start_step * per_shard
  first_epoch, offset = divmod(first, n)
  ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch).skip(offset)
  ds = ds.enumerate(start=first)

  def seeded(i, example):
    example_seed = tf.stack([tf.constant(seed * 7919 + shard + _AUGMENT_SALT, tf.int64), i])
    return augment(example_seed, example)

  ds = ds.map(seeded, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(per_shard, drop_remainder=True)


def _unet_weights(label, kwargs):
  """The U-Net paper's border weight map, computed on the host with scipy."""
  options = {k: v for k, v in kwargs.items() if k in ("w0", "sigma", "class_weights")}

  def fn(lab):
    return weight_map.unet_weight_map(lab, **options)
  weight = tf.numpy_function(fn, [label], tf.float32)
  weight.set_shape(label.shape)
  return weight


def eval_batches(config, process_index=None, process_count=None, split=None,
                 local_devices=1):
  """Yields the host-local evaluation batches, padded, with a "mask".

  The per-host batch is eval.batch_size / P rounded up to a multiple of
  `local_devices`. Every host yields the same number of batches. Images are
  padded to `eval.image_size` (if set, label 255 there) and then resized to
  `eval.resize_to` (if set) while labels keep the full resolution.

  Yields:
    dict: "image" float32 [b,h,w,3], "label" int32 [b,H,W], "mask" int32 [b].
  """
  aug = config.augment
  size = tuple(config.eval.get("image_size") or ()) or None
  resize_to = tuple(config.eval.get("resize_to") or ()) or None

  def prepare(example):
    out = transforms.eval_transform(semantic_example(example), pad_size=size,
                                    mean=tuple(aug.mean), std=tuple(aug.std))
    if resize_to:  # The model sees this size; labels keep theirs (eval_step).
      out["image"] = tf.image.resize(out["image"], resize_to, method="bilinear")
    out["mask"] = tf.constant(1, tf.int32)
    return out

  def blank(ds):  # Padding examples: label all ignore, mask 0.
    return {k: tf.zeros_like(v) if k != "label" else tf.fill(tf.shape(v), IGNORE)
            for k, v in next(iter(ds.take(1))).items()}

  ds = evaluation_stream(config, prepare, blank, split=split,
                         process_index=process_index, process_count=process_count,
                         local_devices=local_devices)
  yield from _checked(ds, config)


def evaluation_stream(config, prepare, blank, split=None, process_index=None,
                      process_count=None, local_devices=1):
  """This host's evaluation batches as a tf.data.Dataset (the stream of the
  module docstring; also used for instance data).

  Args:
    prepare: tfds example -> example with a "mask" of 1.
    blank: the prepared dataset -> one padding example (its "mask" 0), added
      so that every host yields the same number of batches.
    local_devices: the per-host batch, eval.batch_size / P, is rounded up to
      a multiple of this.
  """
  index, count = _process(process_index, process_count)
  split = split or config.eval.split
  builder = _builder(config)
  host_splits = tfds.even_splits(split, n=count, drop_remainder=False)
  sizes = [_num_examples(builder, s) for s in host_splits]
  if sum(sizes) == 0:
    raise DataError(f"evaluation split {split!r} of {builder.name} is empty; "
                    "check the dataset files or set eval.split")
  per_host = math.ceil(config.eval.batch_size / count / local_devices) * local_devices
  num_batches = math.ceil(max(sizes) / per_host)
  host_split = tfds.split_for_jax_process(split, process_index=index,
                                          process_count=count)
  ds = builder.as_dataset(split=host_split, shuffle_files=False)
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  padding = num_batches * per_host - sizes[index]
  if padding:
    ds = ds.concatenate(tf.data.Dataset.from_tensors(blank(ds)).repeat(padding))
  return ds.batch(per_host)


def eval_examples(config, split=None, process_index=None, process_count=None):
  """Yields this host's evaluation examples one by one, at their own size.

  For `segjax eval`'s per-image inference (segjax.inference): no padding,
  no resizing; each host reads `tfds.split_for_jax_process(split)`.

  Yields:
    (image float32 [H, W, 3] normalised, label int32 [H, W]) numpy pairs.
  """
  index, count = _process(process_index, process_count)
  split = split or config.eval.split
  builder = _builder(config)
  if _num_examples(builder, split) == 0:
    raise DataError(f"evaluation split {split!r} of {builder.name} is empty; "
                    "check the dataset files or set eval.split")
  aug = config.augment
  host_split = tfds.split_for_jax_process(split, process_index=index,
                                          process_count=count)
  ds = builder.as_dataset(split=host_split, shuffle_files=False)
  ds = ds.map(semantic_example).map(lambda ex: transforms.eval_transform(
      ex, mean=tuple(aug.mean), std=tuple(aug.std)))
  for example in _checked(ds.batch(1), config):
    yield example["image"][0], example["label"][0]


def _options():
  options = tf.data.Options()
  options.deterministic = True  # parallel maps keep the order: resumable streams
  # tf.data's autotuning thread notices only late that its iterator is being
  # destroyed: a dropped training iterator took 12 s to free at the end of
  # every run. Without autotuning, AUTOTUNE parallelism is one call per core.
  options.autotune.enabled = False
  return options


def _checked(ds, config, check=None):
  """Iterates `ds` as numpy, naming data errors; `check(batch, config)` (default:
  semantic labels within [0, num_classes)) raises DataError for bad batches."""
  check = check or (lambda batch, config: check_labels(
      batch["label"], config.num_classes, config.dataset))
  iterator = ds.with_options(_options()).as_numpy_iterator()
  while True:
    try:
      host_batch = next(iterator)
    except StopIteration:
      return
    except tf.errors.InvalidArgumentError as e:  # Raised by checks in the graph.
      if "Cannot batch tensors with different shapes" in e.message:
        raise DataError(
            f"dataset {config.dataset}: images of different sizes cannot be batched "
            "for evaluation; set eval.image_size to at least the largest (h, w) "
            "(they are padded to it, padding ignored), or eval.batch_size=1") from e
      raise DataError(f"dataset {config.dataset}: {e.message.splitlines()[0]}") from e
    check(host_batch, config)
    yield host_batch


def check_labels(labels, num_classes, dataset):
  """Raises DataError for label values outside [0, num_classes) other than 255."""
  bad = (labels != IGNORE) & ((labels < 0) | (labels >= num_classes))
  if bad.any():
    values = np.unique(labels[bad])[:10].tolist()
    raise DataError(
        f"dataset {dataset} has label values {values} outside [0, {num_classes}) "
        f"(255 = ignore is allowed); set num_classes to cover them or remap the "
        "labels when building the dataset")

