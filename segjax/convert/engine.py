"""The conversion engine: tensor layouts (KINDS), mapping rows, and
apply_mapping, which fills a model's variables from a state dict strictly.

See segjax.convert for the row format.
"""
from typing import Any, Dict, List, Mapping, NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from segjax.errors import CheckpointError

Row = Tuple[str, Tuple[str, ...], str]

# kind -> (flax collection, flax leaf, torch suffix, torch -> flax layout,
# required). Optional leaves (biases) are expected only where the model has
# them.
KINDS = {
    "conv": [("params", "kernel", "weight", lambda w: w.transpose(2, 3, 1, 0),
              True),
             ("params", "bias", "bias", lambda b: b, False)],
    "linear": [("params", "kernel", "weight", lambda w: w.T, True),
               ("params", "bias", "bias", lambda b: b, False)],
    "bn": [("params", "scale", "weight", lambda w: w, True),
           ("params", "bias", "bias", lambda b: b, True),
           ("batch_stats", "mean", "running_mean", lambda m: m, True),
           ("batch_stats", "var", "running_var", lambda v: v, True)],
    "layernorm": [("params", "scale", "weight", lambda w: w, True),
                  ("params", "bias", "bias", lambda b: b, True)],
}


def _fc_as_conv(k):
  return [("params", "kernel", "weight",
           lambda w: w.reshape(w.shape[0], -1, k, k).transpose(2, 3, 1, 0),
           True),
          ("params", "bias", "bias", lambda b: b, False)]


KINDS["fc_as_conv7"] = _fc_as_conv(7)
KINDS["fc_as_conv1"] = _fc_as_conv(1)
# Raw tensors that are parameters themselves, not a module's (a ViT's class
# token [1, 1, C] and position embeddings [1, 1 + h*w, C]): the row's
# torch_module is the key (empty suffix), the leaf the flax param's name.
KINDS["cls_token"] = [("params", "cls_token", "", lambda t: t, True)]
KINDS["pos_embed"] = [("params", "pos_embed", "", lambda t: t, True)]
# Inverse layouts, to report expected shapes in PyTorch's layout.
_TORCH_SHAPE = {
    ("conv", "kernel"): lambda s: (s[3], s[2], s[0], s[1]),
    ("linear", "kernel"): lambda s: (s[1], s[0]),
    ("fc_as_conv7", "kernel"): lambda s: (s[3], s[2] * s[0] * s[1]),
    ("fc_as_conv1", "kernel"): lambda s: (s[3], s[2] * s[0] * s[1]),
}
_SKIPPED_SUFFIXES = ("num_batches_tracked",)


def join(prefix: str, name: str) -> str:
  return f"{prefix}.{name}" if prefix else name



class Conversion(NamedTuple):
  """What a mapping function returns.

  model: the segjax module the variables are for.
  rows: its mapping table.
  state: the state dict to convert (the input, or the input minus keys the
    model deliberately has no use for, e.g. an ImageNet classifier).
  hints: lines telling the user how to fix a mismatch, if one is found.
  """
  model: Any
  rows: List[Row]
  state: Dict[str, np.ndarray]
  hints: Sequence[str] = ()


def classes_hint(state: Mapping[str, np.ndarray], key: str,
                  num_classes: int) -> List[str]:
  if key in state and state[key].shape[0] != num_classes:
    return [f"the checkpoint has {state[key].shape[0]} classes (shape of "
            f"{key}); pass num_classes={state[key].shape[0]} (to fine-tune on "
            "other classes, convert with that and replace the final convs' "
            "params with freshly initialised ones)."]
  return []


def strip_prefix(state, prefix):
  """An ImageNet classifier's state dict -> its feature extractor's.

  Drops the classification head (keys starting with `prefix`), which the
  backbone has no use for.
  """
  return {k: v for k, v in state.items() if not k.startswith(prefix)}


def to_numpy(state_dict: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """Values -> numpy, dropping BN counters; torch imported only if needed."""
  out = {}
  for key, value in state_dict.items():
    if key.rsplit(".", 1)[-1] in _SKIPPED_SUFFIXES:
      continue
    if not isinstance(value, np.ndarray) and hasattr(value, "detach"):
      try:
        import torch  # pylint: disable=g-import-not-at-top
      except ImportError:
        torch = None
      if torch is not None and isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.is_floating_point():
          value = value.float()  # bfloat16 has no numpy counterpart
        value = value.numpy()
    out[key] = np.asarray(value)
  return out


def template(model) -> Dict[str, Any]:
  """Shapes of the model's variables, traced without computing anything."""
  # Any size that survives the stride-32 poolings would do.
  images = jnp.zeros((1, 64, 64, 3), jnp.float32)
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), images, train=False))


def tree_lookup(tree, path):
  """tree[path[0]][path[1]]..., or None where the path does not exist."""
  for name in path:
    if not isinstance(tree, Mapping) or name not in tree:
      return None
    tree = tree[name]
  return tree


def tree_set(tree, path, value):
  """Sets tree[path[0]]...[path[-1]] = value, creating missing dicts."""
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def apply_mapping(rows: Sequence[Row], state: Mapping[str, np.ndarray],
                  template: Mapping[str, Any], hints: Sequence[str] = (),
                  what: str = "the model") -> Dict[str, Any]:
  """Builds variables from `state` by `rows`, checked against `template`.

  Args:
    rows: (torch_module, flax_module_path, kind) rows; see the module doc.
    state: torch key -> numpy array.
    template: the model's variables (shapes suffice, e.g. from eval_shape).
    hints: extra lines for the error message (how to fix it).
    what: the model's name, for the message.

  Returns:
    {"params": ..., "batch_stats": ...} (collections the template has), float32.

  Raises:
    CheckpointError: listing every missing, unexpected and wrongly shaped key.
  """
  variables = {collection: {} for collection in template}
  used, missing, wrong = set(), [], []
  for torch_module, flax_path, kind in rows:
    for collection, leaf, suffix, layout, required in KINDS[kind]:
      expected = tree_lookup(template, (collection,) + flax_path + (leaf,))
      if expected is None:
        if required:
          raise AssertionError(f"mapping bug: {what} has no "
                               f"{collection}/{'/'.join(flax_path)}/{leaf}")
        continue
      key = f"{torch_module}.{suffix}" if suffix else torch_module
      if key not in state:
        missing.append(key)
        continue
      used.add(key)
      value = layout(state[key])
      if value.shape != tuple(expected.shape):
        to_torch = _TORCH_SHAPE.get((kind, leaf), lambda s: s)
        wrong.append(f"{key}: shape {tuple(state[key].shape)}, expected "
                     f"{tuple(to_torch(tuple(expected.shape)))}")
        continue
      tree_set(variables[collection], flax_path + (leaf,),
           jnp.asarray(value, jnp.float32))
  unexpected = sorted(set(state) - used)
  if missing or unexpected or wrong:
    lines = [f"the PyTorch state dict does not match {what}:"]
    for title, keys in (("missing keys", missing),
                        ("unexpected keys", unexpected),
                        ("wrong shapes", wrong)):
      if keys:
        lines.append(f"  {title} ({len(keys)}): {', '.join(keys)}")
    lines += [f"  hint: {h}" for h in hints]
    lines.append("  Check that the converter name and model options (e.g. "
                 "num_classes, aux) match the PyTorch model that saved it.")
    raise CheckpointError("\n".join(lines))
  # Every variable must come from the checkpoint; a leaf no row fills is a
  # bug in the table, not the user's fault.
  filled = {jax.tree_util.keystr(p) for p, _ in
            jax.tree_util.tree_flatten_with_path(variables)[0]}
  for path, _ in jax.tree_util.tree_flatten_with_path(dict(template))[0]:
    if jax.tree_util.keystr(path) not in filled:
      raise AssertionError(f"mapping bug: nothing fills {path} of {what}")
  return variables


