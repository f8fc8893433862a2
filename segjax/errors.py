"""Errors a user can cause and fix.

Everything a user can get wrong — a path, a config key, a dataset, a
checkpoint, a diverging run — raises a :class:`SegjaxError` subclass whose
message says what is wrong and how to fix it. The CLI prints the message
without a traceback and exits with status 2. Internal bugs raise ordinary
exceptions so their tracebacks stay visible.
"""


class SegjaxError(Exception):
  """Base class of every user-facing error."""

  exit_code = 2


class ConfigError(SegjaxError):
  """A config file, key, value or model name is wrong."""


class DataError(SegjaxError):
  """A dataset, image, mask or label is missing, malformed or out of range."""


class CheckpointError(SegjaxError):
  """A checkpoint is unreadable, corrupt or belongs to another model."""


class TrainingError(SegjaxError):
  """Training cannot go on, e.g. the loss became NaN or Inf."""
