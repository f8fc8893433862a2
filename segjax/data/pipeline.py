"""Semantic segmentation input: tfds -> host-local numpy batches.

Examples are decoded to {"image", "label"} (`semantic_example`), augmented
with segjax.data.transforms and read through segjax.data.streams, whose
docstring says how the training stream shards, seeds and resumes and how
evaluation reads each example on exactly one host.
"""
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from segjax.data import streams, transforms, weight_map
from segjax.errors import DataError

IGNORE = 255


def semantic_example(example):
  """tfds features -> {"image": uint8 [H,W,3], "label": int32 [H,W]}."""
  label = example["segmentation_mask"]
  if label.shape.rank == 3:
    label = label[..., 0]
  return {"image": example["image"], "label": tf.cast(label, tf.int32)}


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

  ds = streams.training_stream(
      config, semantic_example, augment, start_step=start_step,
      process_index=process_index, process_count=process_count, split=split)
  yield from streams.checked(ds, config, _check_batch)


def _unet_weights(label, kwargs):
  """The U-Net paper's border weight map, computed on the host with scipy."""
  options = {k: v for k, v in kwargs.items() if k in ("w0", "sigma", "class_weights")}

  def fn(lab):
    return weight_map.unet_weight_map(lab, **options)
  weight = tf.numpy_function(fn, [label], tf.float32)
  weight.set_shape(label.shape)
  return weight


def eval_examples(config, split=None, process_index=None, process_count=None):
  """Yields this host's evaluation examples one by one, at their own size.

  For per-image evaluation (segjax.evaluation): no padding, no resizing;
  each host reads `tfds.split_for_jax_process(split)`, so every example is
  read by exactly one host.

  Yields:
    (name, image float32 [H, W, 3] normalised, label int32 [H, W]): name is
    the example's file_name where the dataset has one, else its tfds id.
  """
  index, count = streams.process(process_index, process_count)
  split = split or config.eval.split
  builder = streams.builder(config)
  if streams.num_examples(builder, split) == 0:
    raise DataError(f"evaluation split {split!r} of {builder.name} is empty; "
                    "check the dataset files or set eval.split")
  aug = config.augment
  host_split = tfds.split_for_jax_process(split, process_index=index,
                                          process_count=count)
  ds = builder.as_dataset(split=host_split, shuffle_files=False,
                          read_config=tfds.ReadConfig(add_tfds_id=True))

  def prepare(example):
    out = transforms.eval_transform(semantic_example(example), mean=tuple(aug.mean),
                                    std=tuple(aug.std))
    out["name"] = example.get("file_name", example["tfds_id"])
    return out

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)
  for example in streams.checked(ds, config, check=lambda *_: None):
    name = example["name"].decode()
    check_labels(example["label"], config.num_classes, f"{config.dataset} (image {name})")
    yield name, example["image"], example["label"]


def check_labels(labels, num_classes, dataset):
  """Raises DataError for label values outside [0, num_classes) other than 255."""
  bad = (labels != IGNORE) & ((labels < 0) | (labels >= num_classes))
  if bad.any():
    values = np.unique(labels[bad])[:10].tolist()
    raise DataError(
        f"dataset {dataset} has label values {values} outside [0, {num_classes}) "
        f"(255 = ignore is allowed); set num_classes to cover them or remap the "
        "labels when building the dataset")


def _check_batch(batch, config):
  check_labels(batch["label"], config.num_classes, config.dataset)
