"""Every converter against the state_dict of the PyTorch module it is for.

test_convert.test_round_trip_every_converter makes its torch-layout input
from the converter's own table, so a key the table misnames, or a shape it
gets wrong, passes there. Here the input is the state_dict of the module
the converter names (torchvision's, timm's, Hugging Face's), built at the
size of the released checkpoints: a converter whose keys, shapes or default
sizes drift from the library's fails. The modules are built on PyTorch's
"meta" device, which gives names and shapes without allocating or
initialising anything (the torch counterpart of jax.eval_shape), so
ResNet-101, VGG16's 138 M parameters, SegFormer-B5 and ViT-L cost little.

Values play no part here, so a transpose that keeps the shape (a square
kernel) is not seen: that is the numerical parity tests' job, listed in
NUMERICAL_PARITY below.

The conversion is the strict one users get: every key used (only the heads
a converter documents as dropped are left over), every shape the model's;
counting elements proves each tensor lands exactly once.
"""
import jax
import numpy as np
import pytest

from conftest import needs
from segjax import convert

# Hugging Face SegFormer sizes, from the hub's nvidia/mit-b0 .. mit-b5 and
# nvidia/segformer-b*-finetuned-ade-512-512 config.json files (written out
# here rather than read from segjax, so that a wrong segjax default shows).
# B1..B5 share widths and heads; decoder_hidden_size is 256 for B0/B1 and
# 768 for B2..B5.
HF_SEGFORMER = {
    "b0": dict(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2],
               decoder_hidden_size=256),
    "b1": dict(hidden_sizes=[64, 128, 320, 512], depths=[2, 2, 2, 2],
               decoder_hidden_size=256),
    "b2": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 6, 3],
               decoder_hidden_size=768),
    "b3": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 18, 3],
               decoder_hidden_size=768),
    "b4": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 8, 27, 3],
               decoder_hidden_size=768),
    "b5": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 6, 40, 3],
               decoder_hidden_size=768),
}


def _torchvision(path, **kwargs):
  """torchvision.models[.path] builder, no weights downloaded."""
  def build():
    torchvision = needs("torchvision")
    module = torchvision.models
    *packages, name = path.split(".")
    for package in packages:
      module = getattr(module, package)
    return getattr(module, name)(**kwargs)
  return build


def _segformer(size, head):
  """transformers' SegFormer of `size`, with `head`: "semantic" (the
  segformer-b*-finetuned-* checkpoints, ADE20K's 150 classes) or "imagenet"
  (the nvidia/mit-b* encoder checkpoints)."""
  def build():
    transformers = needs("transformers")
    if head == "semantic":
      config = transformers.SegformerConfig(num_labels=150,
                                            **HF_SEGFORMER[size])
      return transformers.SegformerForSemanticSegmentation(config)
    config = transformers.SegformerConfig(num_labels=1000, **HF_SEGFORMER[size])
    return transformers.SegformerForImageClassification(config)
  return build


def _timm(name):
  def build():
    timm = needs("timm")
    return timm.create_model(name, pretrained=False)
  return build


_SEG = dict(weights=None, weights_backbone=None, aux_loss=True)
# converter -> (builder of the real module, prefixes of the keys the
# converter drops by design: ImageNet classifiers the dense models never
# compute).
MODULES = {
    "resnet50": (_torchvision("resnet50"), ("fc.",)),
    "resnet101": (_torchvision("resnet101"), ("fc.",)),
    "vgg16": (_torchvision("vgg16"), ("classifier.",)),
    "vgg16_bn": (_torchvision("vgg16_bn"), ("classifier.",)),
    "vgg16_fc": (_torchvision("vgg16"), ("classifier.6.",)),
    "fcn_resnet50": (_torchvision("segmentation.fcn_resnet50", **_SEG), ()),
    "fcn_resnet101": (_torchvision("segmentation.fcn_resnet101", **_SEG), ()),
    "deeplab_v3_resnet50": (
        _torchvision("segmentation.deeplabv3_resnet50", **_SEG), ()),
    "deeplab_v3_resnet101": (
        _torchvision("segmentation.deeplabv3_resnet101", **_SEG), ()),
    "fasterrcnn_resnet50_fpn": (_torchvision(
        "detection.fasterrcnn_resnet50_fpn", weights=None,
        weights_backbone=None), ()),
    "maskrcnn_resnet50_fpn": (_torchvision(
        "detection.maskrcnn_resnet50_fpn", weights=None,
        weights_backbone=None), ()),
    **{f"segformer_{size}": (_segformer(size, "semantic"), ())
       for size in HF_SEGFORMER},
    **{f"mit_{size}": (_segformer(size, "imagenet"), ("classifier.",))
       for size in HF_SEGFORMER},
    **{f"vit_{size}_patch16_384": (_timm(f"vit_{size}_patch16_384"), ("head.",))
       for size in ("base", "large")},
}

# Converters whose outputs are also compared with the PyTorch module's on
# random weights (the test that does it). The others share their mapping
# function with one of these and differ only in sizes (ResNet-101 vs -50,
# SegFormer / MiT B1..B5 vs B0 and a non-default configuration, ViT-L vs a
# small ViT), which MODULES checks at the real sizes.
NUMERICAL_PARITY = {
    "resnet50": "test_convert.py::test_resnet50_parity",
    "vgg16": "test_convert.py::test_vgg16_parity",
    "vgg16_bn": "test_convert.py::test_vgg16_parity",
    "vgg16_fc": "test_convert.py::test_vgg16_fc_parity",
    "fcn_resnet50": "test_convert.py::test_segmentation_parity",
    "deeplab_v3_resnet50": "test_convert.py::test_segmentation_parity",
    "fasterrcnn_resnet50_fpn": "models/detection/test_fasterrcnn_parity.py",
    "maskrcnn_resnet50_fpn": "models/detection/test_maskrcnn_parity.py",
    "segformer_b0": "test_convert_huggingface.py::test_segformer_b0_parity",
    "segformer_b2": ("test_convert_huggingface.py::"
                     "test_non_default_configuration_parity"),
    "mit_b0": "test_convert_huggingface.py::test_encoder_parity",
    "vit_base_patch16_384": ("test_convert_timm.py::"
                             "test_intermediate_layers_parity"),
}


def test_every_converter_is_covered():
  """A new converter needs a row in MODULES: no converter goes unchecked
  against the library whose checkpoints it reads."""
  assert sorted(MODULES) == convert.available()
  assert set(NUMERICAL_PARITY) <= set(MODULES)


def _meta_state(build):
  """The module's state_dict as (shape-only) numpy arrays: names and shapes
  of the real thing, no memory behind the meta tensors."""
  torch = needs("torch")
  with torch.device("meta"):
    module = build()
  zero = np.zeros((), np.float32)
  return {k: np.broadcast_to(zero, tuple(v.shape))
          for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_real_state_dict_converts(name):
  """The module's whole state_dict converts strictly into the model the
  converter builds by default, every tensor once."""
  build, dropped = MODULES[name]
  state = _meta_state(build)
  variables = convert.from_torch(name, state)
  # BatchNorm2d's counters are skipped by design; FrozenBatchNorm2d has none.
  used = {k: v for k, v in state.items() if not k.startswith(dropped)
          and not k.endswith(".num_batches_tracked")}
  if dropped:  # the table's prefixes name keys the module really has
    assert any(k.startswith(dropped) for k in state), dropped
  want = sum(v.size for v in used.values())
  got = sum(int(np.prod(leaf.shape))
            for leaf in jax.tree_util.tree_leaves(variables))
  assert got == want
