"""The model registry: a plain dict from name to Flax module constructor.

  model = segjax.models.build("unet", num_classes=21, base_width=32)
  variables = model.init(rng, images, train=False)
  outputs = model.apply(variables, images, train=False)  # {"logits": ...}

Every semantic model follows the same contract (docs/design.md, "Model contract"): called
as `model.apply(variables, images [N, H, W, 3], train=...)`, it returns a dict
with "logits" [N, H, W, num_classes] float32 at the input resolution, plus
optional extra heads. tests/models/test_contract.py checks every entry here.

Detectors (Mask R-CNN's variants, and Faster R-CNN's: the same without the
mask branch) are in DETECTORS: they take images and return detections
(segjax.models.detection.mask_rcnn), so they have their own contract and
their own task (segjax/tasks/instance.py); `task(name)` tells the two kinds
apart and `build` builds either.

To add a model, import its module and add one line to MODELS; size variants
are `functools.partial`s of the same class.
"""
import functools
import inspect
from typing import Any, Callable, Dict

import flax.linen as nn
import jax.numpy as jnp

from segjax.errors import ConfigError
from segjax.models import deconvnet
from segjax.models import deeplab
from segjax.models import deeplab_resnet
from segjax.models import fcn
from segjax.models import parsenet
from segjax.models import segformer
from segjax.models import segnet
from segjax.models import setr
from segjax.models import torchvision_seg
from segjax.models import unet
from segjax.models import unet3p
from segjax.models import unet_pp
from segjax.models.detection import mask_rcnn

MODELS: Dict[str, Callable[..., nn.Module]] = {
    "unet": unet.UNet,
    "unet_pp": unet_pp.UNetPlusPlus,
    "unet3p": unet3p.UNet3Plus,
    "fcn_resnet50": torchvision_seg.FCNResNet,
    "deeplab_v3_resnet50": torchvision_seg.DeepLabV3ResNet,
    "fcn_resnet101": torchvision_seg.FCNResNet101,
    "deeplab_v3_resnet101": torchvision_seg.DeepLabV3ResNet101,
    "fcn32s": fcn.FCN32s,
    "fcn16s": fcn.FCN16s,
    "fcn8s": fcn.FCN8s,
    "deconvnet": deconvnet.DeconvNet,
    "segnet": segnet.SegNet,
    "deeplab_v1": deeplab.DeepLabV1,
    "deeplab_v2": deeplab_resnet.DeepLabV2,
    "deeplab_v3": deeplab_resnet.DeepLabV3,
    "deeplab_v3_plus": deeplab_resnet.DeepLabV3Plus,
    "parsenet": parsenet.ParseNet,
    "setr_naive": setr.SETRNaive,
    "setr_pup": setr.SETRPUP,
    "setr_mla": setr.SETRMLA,
    "segformer_b0": segformer.SegFormerB0,
    "segformer_b1": segformer.SegFormerB1,
    "segformer_b2": segformer.SegFormerB2,
    "segformer_b3": segformer.SegFormerB3,
    "segformer_b4": segformer.SegFormerB4,
    "segformer_b5": segformer.SegFormerB5,
}


# Mask R-CNN and Faster R-CNN variants: num_classes counts the background
# (91 for COCO).
DETECTORS: Dict[str, Callable[..., nn.Module]] = {
    name: functools.partial(mask_rcnn.build_detector, name)
    for name in mask_rcnn.VARIANTS}


def available() -> list:
  """Sorted names `build` accepts (semantic models and detectors)."""
  return sorted(MODELS) + sorted(DETECTORS)


def task(name: str) -> str:
  """"semantic" for MODELS, "instance" for DETECTORS.

  Raises:
    ConfigError: for an unknown name.
  """
  if name in DETECTORS:
    return "instance"
  if name in MODELS:
    return "semantic"
  raise ConfigError(f"unknown model {name!r}; valid models are: "
                    f"{', '.join(available())}.")


def _options(constructor: Callable[..., Any]) -> tuple:
  """Keyword arguments the constructor takes, or None if it takes **kwargs."""
  params = inspect.signature(constructor).parameters.values()
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
    return None
  return tuple(p.name for p in params if p.name not in ("parent", "name"))


def build(name: str, num_classes: int, **kwargs) -> nn.Module:
  """Constructs the model registered as `name`.

  Args:
    name: a key of MODELS or DETECTORS.
    num_classes: number of output classes (detectors: background included).
    **kwargs: the model's options, e.g. base_width=32 for "unet". A string
      `dtype` ("bfloat16", "float32"), as configs hold it, becomes a dtype.

  Returns:
    An unbound flax.linen Module.

  Raises:
    ConfigError: for an unknown name or option, or an invalid option value.
  """
  constructor = (MODELS if task(name) == "semantic" else DETECTORS)[name]
  options = _options(constructor)
  if options is not None:
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
      raise ConfigError(
          f"model {name!r} has no option(s) {', '.join(unknown)}; its options "
          f"are: {', '.join(o for o in options if o != 'num_classes')}.")
  if isinstance(kwargs.get("dtype"), str):
    try:
      kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
    except TypeError as e:
      raise ConfigError(f"model {name!r}: dtype={kwargs['dtype']!r} is not a "
                        "dtype; use e.g. 'float32' or 'bfloat16'.") from e
  # Configs read back from config.json hold lists where the file had tuples;
  # modules are static jit arguments, so their options must be hashable.
  kwargs = {k: _hashable(v) for k, v in kwargs.items()}
  return constructor(num_classes=num_classes, **kwargs)


def _hashable(value):
  """Lists (nested too) -> tuples."""
  if isinstance(value, (list, tuple)):
    return tuple(_hashable(v) for v in value)
  return value
