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
  layernorm  weight/bias -> params scale/bias
  fc_as_conv7, fc_as_conv1
          a Linear layer as a k x k conv (FCN's "convolutionalisation"):
          weight [O, I*k*k] (flattened C, H, W, as torchvision's VGG
          flattens pool5) -> kernel [k, k, I, O]; bias -> bias

A bias is expected exactly when the segjax module has one. The conversion is
strict: every table row's tensors must be present with the shape the model
expects, every checkpoint key must be used (BatchNorm's num_batches_tracked
counters are the only keys skipped), and all mismatches are reported at once
in one CheckpointError. To support another model, write its mapping function
(in the file of its source library), with a new kind in engine.KINDS if it
owns other tensors, and add it to that file's table. Putting converted ImageNet backbones into whole models, and weight
files into init_from checkpoints, is segjax.weights.

Layout: engine.py (KINDS, rows, apply_mapping), one file of mapping tables per
source library (torchvision.py, ...), and this file, which joins their tables
into CONVERTERS.

torch is never imported unless a value is a torch tensor.
"""
from typing import Any, Callable, Dict, Mapping

from segjax.convert import engine
from segjax.convert import huggingface
from segjax.convert import timm
from segjax.convert import torchvision
from segjax.convert.engine import (KINDS, Conversion, Row, apply_mapping,
                                   tree_lookup, tree_set)
from segjax.errors import ConfigError

__all__ = ["CONVERTERS", "KINDS", "Conversion", "Row", "apply_mapping",
           "available", "from_torch", "tree_lookup", "tree_set"]

CONVERTERS: Dict[str, Callable[..., Conversion]] = {
    **torchvision.TORCHVISION,
    **huggingface.HUGGINGFACE,
    **timm.TIMM,
}


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
      from them, see `segjax.weights.vgg16_into`. "segformer_b0".."b5" /
      "mit_b0".."b5": Hugging Face SegFormer / MiT state dicts, see
      segjax.convert.huggingface.
      "maskrcnn_resnet50_fpn" / "fasterrcnn_resnet50_fpn": torchvision
      detection state dicts -> detection.networks.MaskRCNNNetworks
      variables, with or without the mask head: those of the registry's
      "mask_rcnn_r50_fpn" / "faster_rcnn_r50_fpn".
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
  state = engine.to_numpy(state_dict)
  conversion = CONVERTERS[name](state, **kwargs)
  return engine.apply_mapping(conversion.rows, conversion.state,
                       engine.template(conversion.model), conversion.hints,
                       what=f"{name!r}")
