"""Where training reports go: stdout lines, metrics.jsonl and TensorBoard.

Only the primary process (process 0) writes files, so several hosts sharing
a workdir do not write each row several times.
"""
import json
import math
import os
import sys
import time

import numpy as np


class MetricsWriter:
  """Appends rows to <workdir>/metrics.jsonl and TensorBoard event files.

  A row is {"step": int, "split": "train" | "validation" | ..., **scalars};
  list values (per-class IoU) go to the JSON file only.
  """

  def __init__(self, workdir, primary=True, tensorboard=True):
    self.primary = primary
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if primary and tensorboard:
      import tensorflow as tf  # tf.summary writes the standard event files.
      self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def write(self, step, split, values):
    if not self.primary:
      return
    row = {"step": int(step), "split": split}
    row.update({k: _jsonable(v) for k, v in values.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      import tensorflow as tf
      with self._tb.as_default(step=int(step)):
        for key, value in values.items():
          if np.ndim(value) == 0 and np.isfinite(value):
            tf.summary.scalar(f"{split}/{key}", float(value))
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def _jsonable(value):
  if isinstance(value, (list, tuple, np.ndarray)):
    return [_jsonable(v) for v in np.asarray(value).tolist()]
  value = float(value) if not isinstance(value, (int, str)) else value
  return None if isinstance(value, float) and math.isnan(value) else value


class Progress:
  """One line per log interval: step, loss, learning rate, images/s, ETA."""

  def __init__(self, total_steps, primary=True, stream=None):
    self.total = total_steps
    self.primary = primary
    self.stream = stream or sys.stdout
    self.start = time.time()

  def line(self, step, values):
    if not self.primary:
      return
    elapsed = time.time() - self.start
    parts = [f"step {step:>6d}/{self.total}"]
    for key, fmt in (("loss", ".4f"), ("learning_rate", ".2e"), ("images_per_sec", ".1f")):
      if key in values:
        parts.append(f"{key.replace('_per_sec', '/s').replace('learning_rate', 'lr')} "
                     f"{values[key]:{fmt}}")
    parts.append(f"elapsed {_duration(elapsed)}")
    self.print(" | ".join(parts))

  def print(self, text):
    if self.primary:
      print(text, file=self.stream, flush=True)


def _duration(seconds):
  minutes, seconds = divmod(int(seconds), 60)
  return f"{minutes}m{seconds:02d}s"
