"""PyTorch state dicts -> segjax variables.

  variables = convert.from_torch("deeplab_v3_resnet50", torch_model.state_dict(),
                                 num_classes=21)
  outputs = model.apply(variables, images, train=False)

Every supported name has a *mapping function* returning (as a Conversion)
the segjax model and a table of `(torch_module, flax_module_path, kind)` rows, e.g.
("backbone.layer1.0.conv1", ("backbone", "layer1_0", "conv1"), "conv"). The
kind says which tensors the module owns and how they are laid out:

  conv    weight [O, I, kh, kw] -> kernel [kh, kw, I, O]; bias -> bias
  linear  weight [O, I] -> kernel [I, O]; bias -> bias
  bn      weight/bias -> params scale/bias; running_mean/running_var ->
          batch_stats mean/var (BatchNorm2d and FrozenBatchNorm2d alike)
  fc_as_conv7, fc_as_conv1
          a Linear layer as a k x k conv (FCN's "convolutionalisation"):
          weight [O, I*k*k] (flattened C, H, W, as torchvision's VGG
          flattens pool5) -> kernel [k, k, I, O]; bias -> bias

A bias is expected exactly when the segjax module has one. The conversion is
strict: every table row's tensors must be present with the shape the model
expects, every checkpoint key must be used (BatchNorm's num_batches_tracked
counters are the only keys skipped), and all mismatches are reported at once
in one CheckpointError. To support another model (SegFormer from Hugging
Face, Mask R-CNN from torchvision), write its mapping function, with a new
kind in KINDS if it owns other tensors (e.g. LayerNorm), and add it to
CONVERTERS. Putting converted ImageNet backbones into whole models, and weight
files into init_from checkpoints, is segjax.weights.

torch is never imported unless a value is a torch tensor.
"""
from typing import (Any, Callable, Dict, List, Mapping, NamedTuple, Sequence,
                    Tuple)

import jax
import jax.numpy as jnp
import numpy as np

from segjax.errors import CheckpointError, ConfigError
from segjax.models import fcn as fcn_lib
from segjax.models import torchvision_seg
from segjax.models.backbones import resnet as resnet_lib
from segjax.models.backbones import vgg as vgg_lib

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
}


def _fc_as_conv(k):
  return [("params", "kernel", "weight",
           lambda w: w.reshape(w.shape[0], -1, k, k).transpose(2, 3, 1, 0),
           True),
          ("params", "bias", "bias", lambda b: b, False)]


KINDS["fc_as_conv7"] = _fc_as_conv(7)
KINDS["fc_as_conv1"] = _fc_as_conv(1)
# Inverse layouts, to report expected shapes in PyTorch's layout.
_TORCH_SHAPE = {
    ("conv", "kernel"): lambda s: (s[3], s[2], s[0], s[1]),
    ("linear", "kernel"): lambda s: (s[1], s[0]),
    ("fc_as_conv7", "kernel"): lambda s: (s[3], s[2] * s[0] * s[1]),
    ("fc_as_conv1", "kernel"): lambda s: (s[3], s[2] * s[0] * s[1]),
}
_SKIPPED_SUFFIXES = ("num_batches_tracked",)


def _join(prefix: str, name: str) -> str:
  return f"{prefix}.{name}" if prefix else name


# --- mapping tables ---------------------------------------------------------


def resnet_rows(torch_prefix: str, flax_path: Tuple[str, ...],
                stage_sizes: Sequence[int]) -> List[Row]:
  """Rows for a torchvision ResNet (Bottleneck) under `torch_prefix`."""
  rows = [(_join(torch_prefix, "conv1"), flax_path + ("conv1",), "conv"),
          (_join(torch_prefix, "bn1"), flax_path + ("bn1",), "bn")]
  for s, size in enumerate(stage_sizes, 1):
    for b in range(size):
      t = _join(torch_prefix, f"layer{s}.{b}")
      f = flax_path + (f"layer{s}_{b}",)
      for i in (1, 2, 3):
        rows.append((f"{t}.conv{i}", f + (f"conv{i}",), "conv"))
        rows.append((f"{t}.bn{i}", f + (f"bn{i}",), "bn"))
      if b == 0:
        rows.append((f"{t}.downsample.0", f + ("downsample_conv",), "conv"))
        rows.append((f"{t}.downsample.1", f + ("downsample_bn",), "bn"))
  return rows


def vgg_rows(torch_prefix: str, flax_path: Tuple[str, ...],
             stage_sizes: Sequence[int], batch_norm: bool) -> List[Row]:
  """Rows for torchvision's VGG `features` Sequential under `torch_prefix`.

  Its indices count every layer: conv, (BN,) ReLU per conv, then a pool.
  """
  rows, index = [], 0
  for stage, size in enumerate(stage_sizes, 1):
    for i in range(1, size + 1):
      rows.append((_join(torch_prefix, str(index)),
                   flax_path + (f"conv{stage}_{i}",), "conv"))
      index += 1
      if batch_norm:
        rows.append((_join(torch_prefix, str(index)),
                     flax_path + (f"bn{stage}_{i}",), "bn"))
        index += 1
      index += 1  # ReLU
    index += 1  # MaxPool2d
  return rows


def _fcn_head_rows(torch_prefix: str, flax_path: Tuple[str, ...]) -> List[Row]:
  # Sequential(conv, BN, ReLU, Dropout, conv).
  return [(f"{torch_prefix}.0", flax_path + ("block", "conv"), "conv"),
          (f"{torch_prefix}.1", flax_path + ("block", "bn"), "bn"),
          (f"{torch_prefix}.4", flax_path + ("head",), "conv")]


def _deeplab_head_rows(num_rates: int) -> List[Row]:
  # Sequential(ASPP, conv, BN, ReLU, conv); ASPP.convs[i] is Sequential(conv,
  # BN, ReLU) except the pooling branch, Sequential(pool, conv, BN, ReLU).
  rows = []
  for i in range(num_rates + 2):
    first = 1 if i == num_rates + 1 else 0
    f = ("classifier", "aspp", f"convs_{i}")
    rows.append((f"classifier.0.convs.{i}.{first}", f + ("conv",), "conv"))
    rows.append((f"classifier.0.convs.{i}.{first + 1}", f + ("bn",), "bn"))
  rows += [("classifier.0.project.0", ("classifier", "aspp", "project", "conv"),
            "conv"),
           ("classifier.0.project.1", ("classifier", "aspp", "project", "bn"),
            "bn"),
           ("classifier.1", ("classifier", "block", "conv"), "conv"),
           ("classifier.2", ("classifier", "block", "bn"), "bn"),
           ("classifier.4", ("classifier", "head"), "conv")]
  return rows


# --- mapping functions: (state, **kwargs) -> Conversion ----------------------


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


def _classes_hint(state: Mapping[str, np.ndarray], key: str,
                  num_classes: int) -> List[str]:
  if key in state and state[key].shape[0] != num_classes:
    return [f"the checkpoint has {state[key].shape[0]} classes (shape of "
            f"{key}); pass num_classes={state[key].shape[0]} (to fine-tune on "
            "other classes, convert with that and replace the final convs' "
            "params with freshly initialised ones)."]
  return []


def _seg_model(model_cls, state, num_classes=None, aux=None, **kwargs):
  head_key = "classifier.4.weight"  # the final 1x1 conv of both heads
  if num_classes is None:
    if head_key not in state:
      raise CheckpointError(
          f"the checkpoint has no {head_key}, so the number of classes is "
          "unknown; pass num_classes=..., and check that this is a "
          "torchvision segmentation state dict.")
    num_classes = int(state[head_key].shape[0])
  if aux is None:
    # torchvision's checkpoints carry the aux head whenever it was trained
    # with one (aux_loss=True); follow the checkpoint unless told otherwise.
    aux = any(k.startswith("aux_classifier.") for k in state)
  model = model_cls(num_classes=num_classes, aux=aux, **kwargs)
  rows = resnet_rows("backbone", ("backbone",), model.stage_sizes)
  if model_cls is torchvision_seg.DeepLabV3ResNet:
    rows += _deeplab_head_rows(len(model.rates))
  else:
    rows += _fcn_head_rows("classifier", ("classifier",))
  if aux:
    rows += _fcn_head_rows("aux_classifier", ("aux_classifier",))
  hints = _classes_hint(state, head_key, num_classes)
  if not aux and any(k.startswith("aux_classifier.") for k in state):
    hints.append("the checkpoint has an auxiliary head (aux_classifier.*); "
                 "pass aux=True to keep it.")
  return Conversion(model, rows, state, hints)


def _fcn_resnet(state, num_classes=None, aux=None, **kwargs):
  return _seg_model(torchvision_seg.FCNResNet, state, num_classes, aux,
                    **kwargs)


def _deeplab_v3_resnet(state, num_classes=None, aux=None, **kwargs):
  return _seg_model(torchvision_seg.DeepLabV3ResNet, state, num_classes, aux,
                    **kwargs)


def _resnet101(converter):
  """The ResNet-101 variant of a torchvision segmentation converter."""
  return lambda state, **kwargs: converter(
      state, stage_sizes=torchvision_seg.RESNET101_STAGES, **kwargs)


def _strip_classification_head(state, prefix):
  """An ImageNet classifier's state dict -> its feature extractor's.

  Drops the classification head (keys starting with `prefix`), which the
  backbone has no use for.
  """
  return {k: v for k, v in state.items() if not k.startswith(prefix)}


def _resnet(stage_sizes):
  def mapping(state, **kwargs):
    # torchvision's resnet50().state_dict() ends in the ImageNet classifier
    # "fc"; the backbone has none.
    state = _strip_classification_head(state, "fc.")
    model = resnet_lib.ResNet(stage_sizes=stage_sizes, **kwargs)
    return Conversion(model, resnet_rows("", (), stage_sizes), state)
  return mapping


def _vgg(batch_norm):
  def mapping(state, **kwargs):
    # Accepts vgg16().features.state_dict() ("0.weight", ...) and the whole
    # vgg16().state_dict() ("features.0.weight", ..., "classifier.*"), whose
    # fully connected classifier the backbone has no use for.
    if state and all(k.startswith(("features.", "classifier."))
                     for k in state):
      state = {k[len("features."):]: v for k, v in state.items()
               if k.startswith("features.")}
    model = vgg_lib.VGG(batch_norm=batch_norm, **kwargs)
    return Conversion(model, vgg_rows("", (), model.stage_sizes,
                                        batch_norm), state)
  return mapping


def _vgg16_fc(state, **kwargs):
  """torchvision vgg16().state_dict() -> fcn.VGGFC (FCN's params["backbone"]).

  The classifier's Linear layers 0 (fc6, 25088 -> 4096) and 3 (fc7) become
  the 7x7 and 1x1 convs fc6 and fc7; layer 6, the ImageNet fc8, is dropped.
  """
  state = _strip_classification_head(state, "classifier.6.")
  model = fcn_lib.VGGFC(**kwargs)
  rows = vgg_rows("features", ("features",), model.stage_sizes, False)
  rows += [("classifier.0", ("fc6",), "fc_as_conv7"),
           ("classifier.3", ("fc7",), "fc_as_conv1")]
  return Conversion(model, rows, state)


CONVERTERS: Dict[str, Callable[..., Conversion]] = {
    "fcn_resnet50": _fcn_resnet,
    "deeplab_v3_resnet50": _deeplab_v3_resnet,
    "fcn_resnet101": _resnet101(_fcn_resnet),
    "deeplab_v3_resnet101": _resnet101(_deeplab_v3_resnet),
    "resnet50": _resnet((3, 4, 6, 3)),
    "resnet101": _resnet((3, 4, 23, 3)),
    "vgg16": _vgg(False),
    "vgg16_bn": _vgg(True),
    "vgg16_fc": _vgg16_fc,
}


# --- the engine -------------------------------------------------------------


def _to_numpy(state_dict: Mapping[str, Any]) -> Dict[str, np.ndarray]:
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


def _template(model) -> Dict[str, Any]:
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
      key = f"{torch_module}.{suffix}"
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


def available() -> list:
  """Sorted names `from_torch` accepts."""
  return sorted(CONVERTERS)


def from_torch(name: str, state_dict: Mapping[str, Any],
               **kwargs) -> Dict[str, Any]:
  """Converts a PyTorch state dict into segjax variables.

  Args:
    name: a key of CONVERTERS: "fcn_resnet50" / "deeplab_v3_resnet50"
      (torchvision.models.segmentation state dicts -> the registry models of
      the same name); "resnet50" / "resnet101" (torchvision ImageNet state
      dicts, "fc" dropped -> backbones.resnet.ResNet variables, i.e. the
      "backbone" subtree of the segmentation models); "vgg16" / "vgg16_bn"
      (`vgg16().features` or whole-model state dicts, classifier dropped ->
      backbones.vgg.VGG variables); "vgg16_fc" (the whole vgg16() state
      dict, fc6/fc7 as convs, ImageNet fc8 dropped -> fcn.VGGFC variables,
      FCN's params["backbone"]). To initialise a VGG-based registry model
      from them, see `segjax.weights.vgg16_into`.
    state_dict: str -> numpy array or torch tensor.
    **kwargs: model options. Segmentation models: num_classes (default: read
      from the checkpoint's final conv), aux (default: whether the checkpoint
      has aux_classifier.*), and e.g. dtype or bn_axis_name; backbones: e.g.
      output_stride, ceil_mode.

  Returns:
    {"params": ..., "batch_stats": ...} (no "batch_stats" for plain VGG), as
    the model's init returns them, float32.

  Raises:
    ConfigError: for an unknown name.
    CheckpointError: if the state dict does not fit the model; the message
      lists every missing, unexpected and wrongly shaped key at once.
  """
  if name not in CONVERTERS:
    raise ConfigError(f"no converter for {name!r}; available: "
                      f"{', '.join(available())}.")
  state = _to_numpy(state_dict)
  conversion = CONVERTERS[name](state, **kwargs)
  return apply_mapping(conversion.rows, conversion.state,
                       _template(conversion.model), conversion.hints,
                       what=f"{name!r}")
