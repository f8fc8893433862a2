"""Argument normalisation shared by the operators: an int or an (h, w) pair."""
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from segjax.errors import ConfigError

IntPair = Union[int, Sequence[int]]


def pair(v: IntPair, name: str, minimum: Optional[int] = None) -> Tuple[int, int]:
  """(h, w) from an int or a pair; ConfigError naming `name` otherwise.

  Args:
    v: an int (used for both axes) or a sequence of two ints.
    name: the argument's name, for the message.
    minimum: if given, both values must be >= minimum.
  """
  if isinstance(v, (int, np.integer)):
    v = (int(v), int(v))
  else:
    v = tuple(int(a) for a in v)
  if len(v) != 2 or (minimum is not None and min(v) < minimum):
    at_least = "" if minimum is None else f" (each >= {minimum})"
    raise ConfigError(f"{name} must be an int or a pair (h, w){at_least}, got {v!r}.")
  return v
