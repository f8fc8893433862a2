"""Where training reports go: stdout lines, metrics.jsonl and TensorBoard.

Only the primary process (process 0) writes files, so several hosts sharing
a workdir do not write each row several times.
"""
import json
import math
import os
import sys
import time
from typing import Any, Dict, Optional, TextIO

import numpy as np


class MetricsWriter:
  """Appends rows to <workdir>/metrics.jsonl and TensorBoard event files.

  A row is {"step": int, "split": "train" | "validation" | ..., **scalars};
  list values (per-class IoU) go to the JSON file only.
  """

  def __init__(self, workdir: str, primary: bool = True, tensorboard: bool = True):
    self.primary = primary
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if primary and tensorboard:
      import tensorflow as tf  # tf.summary writes the standard event files.
      self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, values: Dict[str, Any]) -> None:
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

  def rewind(self, step: int) -> None:
    """Drops the rows of steps after `step`, and a last line cut short by a kill.

    The file is rewritten through a temporary file and a rename, so a kill
    during the rewrite leaves either the old or the new file.
    """
    if not self.primary or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      text = f.read()
    lines = text.split("\n")
    partial = lines.pop()  # "" when the file ends with a newline.
    kept = [line for line in lines if not line.strip() or _row_step(line) <= step]
    if not partial and len(kept) == len(lines):
      return
    temporary = self.path + ".rewind"
    with open(temporary, "w") as f:
      f.write("".join(line + "\n" for line in kept))
    os.replace(temporary, self.path)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _row_step(line):
  """The step of one metrics.jsonl line; a line that is not a row is kept."""
  try:
    return int(json.loads(line).get("step", 0))
  except (ValueError, AttributeError):
    return 0


def _jsonable(value):
  if isinstance(value, (list, tuple, np.ndarray)):
    return [_jsonable(v) for v in np.asarray(value).tolist()]
  value = float(value) if not isinstance(value, (int, str)) else value
  return None if isinstance(value, float) and math.isnan(value) else value


class Progress:
  """One line per log interval: step, loss, learning rate, images/s, ETA."""

  def __init__(self, total_steps: int, primary: bool = True, stream: Optional[TextIO] = None):
    self.total = total_steps
    self.primary = primary
    self.stream = stream or sys.stdout
    self.start = time.time()
    self._first = None  # (step, time) of the first line: the rate excludes compiling.

  def line(self, step: int, values: Dict[str, float]) -> None:
    if not self.primary:
      return
    now = time.time()
    parts = [f"step {step:>6d}/{self.total}"]
    for key, fmt in (("loss", ".4f"), ("learning_rate", ".2e"), ("images_per_sec", ".1f")):
      if key in values:
        parts.append(f"{key.replace('_per_sec', '/s').replace('learning_rate', 'lr')} "
                     f"{values[key]:{fmt}}")
    if values.get("nonfinite_steps"):
      parts.append(f"skipped {values['nonfinite_steps']}")
    parts.append(f"elapsed {_duration(now - self.start)}")
    if self._first is None:
      self._first = (step, now)
    elif step < self.total:
      first_step, first_time = self._first
      remaining = (now - first_time) / (step - first_step) * (self.total - step)
      parts.append(f"eta {_duration(remaining)}")
    self.print(" | ".join(parts))

  def print(self, text: str) -> None:
    if self.primary:
      print(text, file=self.stream, flush=True)


def _duration(seconds):
  minutes, seconds = divmod(int(seconds), 60)
  return f"{minutes}m{seconds:02d}s"
