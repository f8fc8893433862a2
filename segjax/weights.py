"""Weight files in, `init_from` checkpoints out: what `segjax convert` does.

    segjax convert --model deeplab_v3 --weights resnet101-63fe2227.pth --output init/
    segjax train --config configs/deeplab_v3_voc.py --workdir run --config.init_from=init/

`load_state_dict` reads a PyTorch state dict from a .pth/.pt/.bin file (needs
torch), a .safetensors file (safetensors, a dependency; not torch) or a
.npz file (numpy alone; e.g. written once with
`np.savez(path, **{k: v.numpy() for k, v in sd.items()})`).
`init_checkpoint` converts it for a registry model: a whole-model checkpoint
(torchvision's fcn_resnet50 / deeplabv3_resnet50 / deeplabv3_resnet101, Hugging
Face's SegformerForSemanticSegmentation) when
the model has a full converter and the file holds its heads, otherwise the
ImageNet backbone alone (torchvision vgg16 / vgg16_bn / resnet50 / resnet101,
Hugging Face nvidia/mit-b*).
`write_checkpoint` saves it where `config.init_from` finds it; the trainer
then takes every tensor the checkpoint has and initialises the rest.
`vgg16_into` / `resnet_into` put converted torchvision ImageNet backbones
into a model's variables (the registry models with such a backbone are
VGG_BACKBONES and RESNET_BACKBONES, the Mask and Faster R-CNN variants
among them); `mit_into` puts Hugging Face's MiT encoders (nvidia/mit-b*) into the
SegFormer models (MIT_BACKBONES); `vit_into` puts timm's ViTs
(vit_base/large_patch16_384) into the SETR models (VIT_BACKBONES).
"""
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from segjax import convert, models
from segjax.models.detection import mask_rcnn
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
    only the backbone subtree (and the C4 detectors' res5, their ROI
    head's share of the ResNet); the trainer initialises the rest.
  """
  model_kwargs = dict(model_kwargs or {})
  # A whole-model checkpoint carries the model's head; without it, the
  # file is an ImageNet (or encoder-only) checkpoint of the backbone.
  head = HEAD_PREFIXES.get(model, "classifier.")
  whole = model in convert.CONVERTERS and any(k.startswith(head)
                                              for k in state_dict)
  if whole:
    return convert.from_torch(model, state_dict, num_classes=num_classes, **model_kwargs)
  if model in RESNET_BACKBONES:
    into, paths = resnet_into, _resnet_paths(model)
  elif model in VGG_BACKBONES:
    into, paths = vgg16_into, (VGG_BACKBONES[model][1],)
  elif model in MIT_BACKBONES:
    into, paths = mit_into, (("backbone",),)
  elif model in VIT_BACKBONES:
    into, paths = vit_into, (VIT_BACKBONES[model],)
  else:
    backbones = (set(RESNET_BACKBONES) | set(VGG_BACKBONES) | set(MIT_BACKBONES)
                 | set(VIT_BACKBONES))
    raise ConfigError(
        f"segjax convert: no PyTorch weights map onto {model!r}; models with an "
        f"ImageNet backbone: {', '.join(sorted(backbones))}")
  module = models.build(model, num_classes=num_classes, **model_kwargs)
  # Shapes are all the backbone converters need: nothing is computed.
  shapes = jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x, train=False),
                          jnp.zeros((1, 224, 224, 3), jnp.float32))
  filled = into(model, shapes, state_dict)
  out = {}
  for collection, tree in filled.items():
    for path in paths:
      subtree = convert.tree_lookup(tree, path)
      if subtree is not None:
        convert.tree_set(out, (collection,) + tuple(path), subtree)
  return out


def write_checkpoint(variables: Mapping[str, Any], output: str) -> str:
  """Saves variables as step 0 of `<output>/checkpoints`; returns the step dir.

  Refuses to overwrite: a converted checkpoint already there stays.
  """
  from segjax.train import checkpoint  # pylint: disable=import-outside-toplevel
  directory = os.path.join(output, "checkpoints")
  if os.path.isdir(os.path.join(directory, "0")):
    raise CheckpointError(f"{directory}/0 already exists; choose another --output "
                          "or remove it first")
  tree = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), dict(variables))
  with checkpoint.Checkpoints(directory, async_save=False) as manager:
    manager.save(0, tree, force=True)
  return os.path.join(directory, "0")


# Where torchvision's VGG weights go in the VGG-based registry models:
# model -> (converter, path of the converted subtree in the model).
VGG_BACKBONES = {
    "fcn32s": ("vgg16_fc", ("backbone",)),
    "fcn16s": ("vgg16_fc", ("backbone",)),
    "fcn8s": ("vgg16_fc", ("backbone",)),
    "deeplab_v1": ("vgg16", ("backbone", "features")),
    "parsenet": ("vgg16", ("backbone", "features")),
    "segnet": ("vgg16_bn", ("encoder",)),
    "deconvnet": ("vgg16_bn", ("encoder",)),
}


def vgg16_into(name: str, variables: Mapping[str, Any],
               state_dict: Mapping[str, Any], **kwargs) -> Dict[str, Any]:
  """Initialises a VGG-based model's backbone from torchvision ImageNet weights.

    model = models.build("fcn8s", num_classes=21)
    variables = model.init(rng, images)
    variables = weights.vgg16_into("fcn8s", variables,
                                   torchvision.models.vgg16(weights=...).state_dict())

  FCN-32s/16s/8s take vgg16's features and fc6/fc7 (as convs, the paper's
  recipe); DeepLab v1 and ParseNet vgg16's features only (their fc6 is a
  dilated 3x3 conv with 1024 channels; the paper's subsampling of VGG's fc6
  is not provided); SegNet and DeconvNet vgg16_bn's features. The model
  must have the paper's widths and stage sizes (and fc width, unless the
  same `fc_width` is passed in kwargs).

  Args:
    name: a key of VGG_BACKBONES.
    variables: the model's variables (e.g. from init).
    state_dict: torchvision vgg16() / vgg16_bn() state dict (whole model or
      `features`, as the converter accepts).
    **kwargs: options of the converter's backbone module, e.g. fc_width.

  Returns:
    A copy of `variables` with the backbone subtree (params and, for BN
    models, batch_stats) replaced by the converted weights.

  Raises:
    ConfigError: for a model without a VGG backbone.
    CheckpointError: if the state dict or the model's shapes do not fit.
  """
  if name not in VGG_BACKBONES:
    raise ConfigError(f"vgg16_into: {name!r} has no VGG backbone; valid: "
                      f"{', '.join(sorted(VGG_BACKBONES))}.")
  converter, path = VGG_BACKBONES[name]
  return _replace_subtree(
      f"vgg16_into: {name!r}", variables, convert.from_torch(converter, state_dict, **kwargs),
      path, converter, "the paper's widths and stage sizes (the defaults)")


def _replace_subtree(what, variables, converted, path, converter, fix):
  """A copy of `variables` with each collection's subtree at `path` replaced.

  Raises CheckpointError (saying to build the model with `fix`) unless the
  converted subtree has exactly the model's structure and shapes.
  """
  out = _to_dicts(variables)
  for collection, tree in converted.items():
    current = convert.tree_lookup(out.get(collection, {}), path)
    same = current is not None and (
        jax.tree_util.tree_structure(current)
        == jax.tree_util.tree_structure(tree)) and all(
            a.shape == b.shape for a, b in zip(
                jax.tree_util.tree_leaves(current),
                jax.tree_util.tree_leaves(tree)))
    if not same:
      raise CheckpointError(
          f"{what}'s {collection}/{'/'.join(path)} does not have the shapes of "
          f"{converter!r}'s weights; build the model with {fix}.")
    convert.tree_set(out[collection], path, tree)
  return out


def _to_dicts(tree):
  """Nested mappings (e.g. FrozenDict) -> plain dicts."""
  if isinstance(tree, Mapping):
    return {k: _to_dicts(v) for k, v in tree.items()}
  return tree


# Where torchvision's ImageNet ResNet weights go in the ResNet-based registry
# models: model -> path of their ResNet subtree (backbones.resnet.ResNet; in
# the C4 Mask / Faster R-CNNs detection.c4.ResNetC4, the stem and layer1..3
# only).
RESNET_BACKBONES = {
    "deeplab_v2": ("backbone",),
    "deeplab_v3": ("backbone",),
    "deeplab_v3_plus": ("backbone",),
    "fcn_resnet50": ("backbone",),
    "deeplab_v3_resnet50": ("backbone",),
    "fcn_resnet101": ("backbone",),
    "deeplab_v3_resnet101": ("backbone",),
    **{name: ("backbone", "body") if spec["layout"] == "fpn" else ("backbone",)
       for name, spec in mask_rcnn.VARIANTS.items()},
}
# Models that run the ResNet's last stage (torchvision's layer4) apart from
# the backbone: model -> path of that stage's blocks (layer4_{b}). The C4
# detectors run it as their ROI head, detection.c4.Res5Head.
RESNET_LAST_STAGES = {name: ("res5",) for name, spec in mask_rcnn.VARIANTS.items()
                      if spec["layout"] == "c4"}
_RESNET_CONVERTERS = {(3, 4, 6, 3): "resnet50", (3, 4, 23, 3): "resnet101"}
_LAST_STAGE = "layer4_"


def _resnet_paths(name: str) -> Tuple[Tuple[str, ...], ...]:
  """The params / batch_stats paths `resnet_into` fills in model `name`."""
  last = RESNET_LAST_STAGES.get(name)
  return (RESNET_BACKBONES[name],) + ((last,) if last else ())


def _blocks_per_stage(names) -> Tuple[int, ...]:
  """Bottlenecks per stage from names like "layer3_5" / "layer3.5.conv1.weight"."""
  counts = [0, 0, 0, 0]
  for name in names:
    head = name.replace(".", "_").split("_")
    if (len(head) > 1 and head[0] in ("layer1", "layer2", "layer3", "layer4")
        and head[1].isdigit()):
      s = int(head[0][-1]) - 1
      counts[s] = max(counts[s], int(head[1]) + 1)
  return tuple(counts)


def resnet_into(name: str, variables: Mapping[str, Any],
                state_dict: Mapping[str, Any]) -> Dict[str, Any]:
  """Initialises a ResNet-based model's backbone from torchvision ImageNet weights.

    model = models.build("deeplab_v3_plus", num_classes=21)  # ResNet-101
    variables = model.init(rng, images)
    variables = weights.resnet_into(
        "deeplab_v3_plus", variables,
        torchvision.models.resnet101(weights=...).state_dict())

  The ImageNet classifier "fc" is dropped; the heads (ASPP, decoder, ...)
  keep their values in `variables`. Dilation, output stride and multi-grid
  have no params, so the same weights fit every output stride. Which of
  torchvision's resnet50 / resnet101 the model takes follows from its
  blocks per stage; the model must have the default width (64).

  Mask and Faster R-CNN (`models.build("mask_rcnn_r50_fpn", 91)` and its
  r101 / C4 / faster_rcnn_* variants): the ResNet is params/backbone/body in the FPN variants; the
  C4 variants take conv1 .. layer3 into params/backbone and layer4 into
  their ROI head, params/res5 (RESNET_LAST_STAGES). BatchNorm scales and
  biases go to params, running means and variances to batch_stats, with
  frozen_bn or without; FPN, RPN and ROI heads keep their values.

  Args:
    name: a key of RESNET_BACKBONES.
    variables: the model's variables (e.g. from init, or eval_shape).
    state_dict: torchvision resnet50() / resnet101() state dict (numpy
      arrays or torch tensors).

  Returns:
    A copy of `variables` with the backbone's params and batch_stats
    replaced by the converted weights (float32).

  Raises:
    ConfigError: for a model without a ResNet backbone.
    CheckpointError: if the state dict and the model's backbone differ
      (depth, width, or a state dict that is not a torchvision ResNet).
  """
  if name not in RESNET_BACKBONES:
    raise ConfigError(f"resnet_into: {name!r} has no ResNet backbone; valid: "
                      f"{', '.join(sorted(RESNET_BACKBONES))}.")
  paths = _resnet_paths(name)
  names = []
  for path in paths:
    subtree = convert.tree_lookup(variables.get("params", {}), path)
    if subtree is None:
      raise CheckpointError(f"resnet_into: the variables have no params/"
                            f"{'/'.join(path)}; pass {name!r}'s variables.")
    names += list(subtree)
  stages = _blocks_per_stage(names)
  if stages not in _RESNET_CONVERTERS:
    raise CheckpointError(
        f"resnet_into: {name!r}'s backbone has {stages} blocks per stage; "
        "torchvision's ImageNet weights exist for ResNet-50 (3, 4, 6, 3) and "
        "ResNet-101 (3, 4, 23, 3): build the model with one of those "
        "stage_sizes.")
  given = _blocks_per_stage(state_dict)
  converter = _RESNET_CONVERTERS[stages]
  if not any(given):
    # E.g. a whole detection or segmentation checkpoint ("backbone.body.
    # layer1.0...", "backbone.layer1.0..."), whose keys are prefixed.
    example = next(iter(state_dict), None)
    raise CheckpointError(
        f"resnet_into: the state dict is not a torchvision ImageNet ResNet "
        f"(no layer1.0.* keys; its first key is {example!r}); pass "
        f"{converter}'s weights, e.g. torchvision.models.{converter}"
        f"(weights=...).state_dict().")
  if given != stages:
    raise CheckpointError(
        f"resnet_into: the state dict has {given} blocks per stage but "
        f"{name!r}'s backbone has {stages}; pass "
        f"{converter}'s weights or build the model with "
        f"stage_sizes={given}.")
  converted = convert.from_torch(converter, state_dict)
  what, fix = f"resnet_into: {name!r}", "the default width (64)"
  if name not in RESNET_LAST_STAGES:
    return _replace_subtree(what, variables, converted, paths[0], converter, fix)
  # The C4 split: layer4_* to the ROI head, the rest to the backbone.
  out = variables
  for path, last in zip(paths, (False, True)):
    part = {collection: {k: v for k, v in tree.items()
                         if k.startswith(_LAST_STAGE) == last}
            for collection, tree in converted.items()}
    out = _replace_subtree(what, out, part, path, converter, fix)
  return out


# Hugging Face's MiT encoders (nvidia/mit-b0 ... mit-b5) in the SegFormer
# models: model -> converter. Their whole-model checkpoints
# (SegformerForSemanticSegmentation) are told apart by the decoder's keys;
# an ImageNet SegformerForImageClassification has a "classifier.*" too.
MIT_BACKBONES = {f"segformer_b{i}": f"mit_b{i}" for i in range(6)}
HEAD_PREFIXES = {name: "decode_head." for name in MIT_BACKBONES}


def mit_into(name: str, variables: Mapping[str, Any],
             state_dict: Mapping[str, Any]) -> Dict[str, Any]:
  """Initialises a SegFormer's encoder from Hugging Face MiT weights.

    model = models.build("segformer_b2", num_classes=150)
    variables = model.init(rng, images)
    variables = weights.mit_into("segformer_b2", variables,
                                 weights.load_state_dict("mit-b2/model.safetensors"))

  Args:
    name: a key of MIT_BACKBONES.
    variables: the model's variables (e.g. from init, or eval_shape).
    state_dict: nvidia/mit-b* (SegformerForImageClassification, its
      ImageNet classifier dropped) or SegformerModel state dict, of the
      model's size.

  Returns:
    A copy of `variables` with params["backbone"] replaced by the converted
    weights; the decoder keeps its values.

  Raises:
    ConfigError: for a model without a MiT encoder.
    CheckpointError: if the state dict is not a MiT of the model's size.
  """
  if name not in MIT_BACKBONES:
    raise ConfigError(f"mit_into: {name!r} has no MiT encoder; valid: "
                      f"{', '.join(sorted(MIT_BACKBONES))}.")
  converter = MIT_BACKBONES[name]
  return _replace_subtree(f"mit_into: {name!r}", variables,
                          convert.from_torch(converter, state_dict), ("backbone",),
                          converter, "the paper's sizes (the defaults)")


# Where timm's ViT weights go in the SETR models: model -> path of their
# backbones.vit.ViT subtree.
VIT_BACKBONES = {"setr_naive": ("backbone",), "setr_pup": ("backbone",),
                 "setr_mla": ("backbone",)}


def vit_into(name: str, variables: Mapping[str, Any],
             state_dict: Mapping[str, Any]) -> Dict[str, Any]:
  """Initialises a SETR's ViT encoder from timm weights.

    model = models.build("setr_pup", num_classes=150)  # ViT-L
    variables = model.init(rng, images)
    variables = weights.vit_into(
        "setr_pup", variables,
        timm.create_model("vit_large_patch16_384", pretrained=True).state_dict())

  The ImageNet head is dropped; so are the class token and its position
  embedding when the model runs without one (SETR-MLA), and the final
  LayerNorm when the model does not apply it (SETR's default). The
  position embeddings keep the checkpoint's grid (24 x 24 for the 384-pixel
  models), which the model must have been built with (`pretrain_grid`);
  the model resizes them to each input's grid.

  Args:
    name: a key of VIT_BACKBONES.
    variables: the model's variables (e.g. from init, or eval_shape).
    state_dict: a timm VisionTransformer state dict (patch 16) of the
      model's width and depth.

  Returns:
    A copy of `variables` with the backbone's params replaced by the
    converted weights (float32); the decoder keeps its values.

  Raises:
    ConfigError: for a model without a ViT encoder.
    CheckpointError: if the state dict and the model's encoder differ.
  """
  if name not in VIT_BACKBONES:
    raise ConfigError(f"vit_into: {name!r} has no ViT encoder; valid: "
                      f"{', '.join(sorted(VIT_BACKBONES))}.")
  path = VIT_BACKBONES[name]
  backbone = convert.tree_lookup(variables.get("params", {}), path)
  if backbone is None or "pos_embed" not in backbone:
    raise CheckpointError(f"vit_into: the variables have no params/"
                          f"{'/'.join(path)}/pos_embed; pass {name!r}'s variables.")
  width = backbone["pos_embed"].shape[-1]
  depth = sum(1 for key in backbone if key.startswith("blocks_"))
  # The table is the same for every size; the name only picks defaults.
  # Heads change no param's shape, so one head fits any width.
  converter = "vit_large_patch16_384" if width == 1024 else "vit_base_patch16_384"
  converted = convert.from_torch(
      converter, state_dict, width=width, depth=depth, num_heads=1,
      class_token="cls_token" in backbone, final_norm="norm" in backbone)
  return _replace_subtree(f"vit_into: {name!r}", variables, converted, path,
                          converter, "pretrain_grid set to the checkpoint's grid")
