"""Weight files in, `init_from` checkpoints out: what `segjax convert` does.

    segjax convert --model deeplab_v3 --weights resnet101-63fe2227.pth --output init/
    segjax train --config configs/deeplab_v3_voc.py --workdir run --config.init_from=init/

`load_state_dict` reads a PyTorch state dict from a .pth/.pt/.bin file (needs
torch), a .safetensors file (needs the safetensors package, not torch) or a
.npz file (numpy alone; e.g. written once with
`np.savez(path, **{k: v.numpy() for k, v in sd.items()})`).
`init_checkpoint` converts it for a registry model: a whole-model checkpoint
(torchvision's fcn_resnet50 / deeplabv3_resnet50 / deeplabv3_resnet101) when
the model has a full converter and the file holds its heads, otherwise the
ImageNet backbone alone (torchvision vgg16 / vgg16_bn / resnet50 / resnet101).
`write_checkpoint` saves it where `config.init_from` finds it; the trainer
then takes every tensor the checkpoint has and initialises the rest.
"""
import os
from typing import Any, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from segjax import convert, models
from segjax.errors import CheckpointError, ConfigError

SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".npz")


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
  """A PyTorch state dict from a weights file, as name -> numpy array.

  Raises:
    CheckpointError: the file is missing, of an unknown kind or unreadable,
      or its reader is not installed.
  """
  if not os.path.isfile(path):
    raise CheckpointError(f"weights file {path!r} does not exist; pass the path of "
                          f"a {'/'.join(SUFFIXES)} file")
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in SUFFIXES:
    raise CheckpointError(f"weights file {path!r}: unknown kind {suffix!r}; segjax "
                          f"reads {', '.join(SUFFIXES)}")
  try:
    if suffix == ".npz":
      with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
    if suffix == ".safetensors":
      from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
      return dict(load_file(path))
    import torch  # pylint: disable=import-outside-toplevel
    state = torch.load(path, map_location="cpu", weights_only=True)
  except ImportError as e:
    raise CheckpointError(f"reading {path!r} needs the {e.name} package: pip install "
                          f"{e.name}, or save the weights as .npz") from e
  except Exception as e:  # A corrupt or foreign file: say so, not how it broke.
    raise CheckpointError(f"weights file {path!r} is unreadable ({type(e).__name__}: "
                          f"{str(e)[:200]})") from e
  # Training scripts often save {"model": state_dict, "optimizer": ...}.
  for key in ("state_dict", "model"):
    if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
      state = state[key]
  if not isinstance(state, Mapping):
    raise CheckpointError(f"weights file {path!r} holds a {type(state).__name__}, "
                          "not a state dict")
  return {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, "detach")}


def _subtree(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _nest(path, value):
  for key in reversed(path):
    value = {key: value}
  return value


def init_checkpoint(model: str, state_dict: Mapping[str, Any], num_classes: int,
                    model_kwargs: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
  """The variables of `model` that `state_dict` provides.

  Args:
    model: a registry name.
    state_dict: torch name -> array (see `load_state_dict`).
    num_classes: the model's classes (whole-model checkpoints must agree).
    model_kwargs: the model's options, as in the config (backbone shapes
      must fit the weights: the paper's widths and stage sizes).

  Returns:
    {"params": ..., "batch_stats": ...}: the whole model's variables, or
    only the backbone subtree (the trainer initialises the heads).
  """
  model_kwargs = dict(model_kwargs or {})
  whole = model in convert.CONVERTERS and any(k.startswith("classifier.")
                                              for k in state_dict)
  if whole:
    return convert.from_torch(model, state_dict, num_classes=num_classes, **model_kwargs)
  if model in convert.RESNET_BACKBONES:
    into, path = convert.resnet_into, convert.RESNET_BACKBONES[model]
  elif model in convert.VGG_BACKBONES:
    into, path = convert.vgg16_into, convert.VGG_BACKBONES[model][1]
  else:
    raise ConfigError(
        f"segjax convert: no PyTorch weights map onto {model!r}; models with an "
        f"ImageNet backbone: {', '.join(sorted(set(convert.RESNET_BACKBONES) | set(convert.VGG_BACKBONES)))}")
  module = models.build(model, num_classes=num_classes, **model_kwargs)
  # Shapes are all the backbone converters need: nothing is computed.
  shapes = jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x, train=False),
                          jnp.zeros((1, 224, 224, 3), jnp.float32))
  filled = into(model, shapes, state_dict)
  return {collection: _nest(path, _subtree(tree, path))
          for collection, tree in filled.items()
          if isinstance(tree, Mapping) and _has_path(tree, path)}


def _has_path(tree, path):
  try:
    _subtree(tree, path)
    return True
  except (KeyError, TypeError):
    return False


def write_checkpoint(variables: Mapping[str, Any], output: str) -> str:
  """Saves variables as step 0 of `<output>/checkpoints`; returns the step dir.

  Refuses to overwrite: a converted checkpoint already there stays.
  """
  from segjax.train import checkpoint  # pylint: disable=import-outside-toplevel
  directory = os.path.join(output, "checkpoints")
  if os.path.isdir(os.path.join(directory, "0")):
    raise CheckpointError(f"{directory}/0 already exists; choose another --output "
                          "or remove it first")
  manager = checkpoint.Checkpoints(directory, async_save=False)
  tree = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), dict(variables))
  manager.save(0, tree, force=True)
  manager.wait()
  manager.close()
  return os.path.join(directory, "0")
