"""Parity of MaskRCNNNetworks with torchvision's maskrcnn_resnet50_fpn.

A randomly initialised torchvision model (FrozenBatchNorm2d backbone with
random statistics and affine params, random FPN / head weights and biases,
so a swapped or transposed tensor shows) is converted with
segjax.convert ("maskrcnn_resnet50_fpn") and both run in eval mode on the
same 2 x 160 x 224 batch and the same proposals: P2-P6, the RPN head's
flattened objectness and deltas (and the anchors they belong to), the
ROI-aligned features, and the box and mask heads' outputs, both end to end
and on identical (torchvision's) pooled features.

Run in the torch venv:
  .venv-parity/bin/python -m pytest -q tests/models/detection/test_maskrcnn_parity.py
"""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import needs
from segjax import convert
from segjax.convert import torchvision as tv_convert
from segjax.models.detection.fpn import FeaturePyramidNetwork
from segjax.models.detection.networks import MaskRCNNNetworks
from segjax.ops import decode_boxes

torch = needs("torch")
torchvision = needs("torchvision")
# pylint: disable=wrong-import-position,import-error
from torchvision_random import nhwc, random_detector, relative_error  # noqa: E402

# README "Parity tests": "FPN features, RPN outputs and box/mask head outputs
# for the same proposals to 4e-6 relative" (measured: at most 3.1e-6).
MASKRCNN_RTOL = 1e-5
# Proposals decoded from the RPN deltas: decoding itself is exact (1e-9 on
# torchvision's own deltas), but it multiplies the deltas' error by the
# anchor sizes, so a random RPN's huge deltas (up to 1.5e3) come out at
# 6.9e-6 here, 6e-6..1.4e-5 over six seeds of the backbone's init (the
# other outputs: 2.1e-6..3.1e-6).
DECODED_RTOL = 3e-5
NUM_CLASSES = 5
IMAGE = (160, 224)
# Per image, (x1, y1, x2, y2): sqrt(area) from 3.5 to 614 px, so FPN level
# assignment picks every one of P2..P5; some extend past the image.
BOXES = (
    [[10., 20., 60., 50.], [0., 0., 224., 160.], [100.5, 30.25, 220., 150.],
     [-60., -80., 300., 250.], [-250., -200., 400., 380.], [50., 60., 54., 63.]],
    [[5., 5., 120., 150.], [30., 40., 90., 45.], [-150., -150., 350., 300.],
     [0., 0., 30., 30.]],
)
FPN_NAMES = ("p2", "p3", "p4", "p5", "p6")


@pytest.fixture(scope="module", autouse=True)
def highest_precision():
  """Full float32 matmuls and convolutions, as PyTorch's CPU kernels do.

  On XLA:CPU the figures are the same either way (measured); on a GPU or
  TPU the default precision would take TF32 / bfloat16 passes and the test
  would measure those rather than the conversion. Module-scoped and
  autouse, so it is set before `case` compiles anything.
  """
  with jax.default_matmul_precision("highest"):
    yield


@pytest.fixture(scope="module")
def case():
  """torchvision's and our outputs on the same images and proposals."""
  from torchvision.models.detection import maskrcnn_resnet50_fpn
  from torchvision.models.detection.image_list import ImageList
  from torchvision.models.detection.rpn import concat_box_prediction_layers
  net, generator = random_detector(maskrcnn_resnet50_fpn, NUM_CLASSES)
  x = torch.randn(2, 3, *IMAGE, generator=generator)
  boxes = [torch.tensor(b) for b in BOXES]
  shapes = [IMAGE] * 2
  ref = {}
  with torch.no_grad():
    feats = net.backbone(x)
    levels = list(feats.values())
    objectness, deltas = net.rpn.head(levels)
    obj, dl = concat_box_prediction_layers(objectness, deltas)
    ref["objectness"], ref["rpn_deltas"] = obj.reshape(2, -1), dl.reshape(2, -1, 4)
    ref["anchors"] = net.rpn.anchor_generator(ImageList(x, shapes), levels)[0]
    ref["proposals"] = net.rpn.box_coder.decode(
        dl, [ref["anchors"]] * 2).reshape(2, -1, 4)
    ref["box_pooled"] = net.roi_heads.box_roi_pool(feats, boxes, shapes)
    ref["class_logits"], box_deltas = net.roi_heads.box_predictor(
        net.roi_heads.box_head(ref["box_pooled"]))
    ref["box_deltas"] = box_deltas.reshape(-1, NUM_CLASSES, 4)
    ref["mask_pooled"] = net.roi_heads.mask_roi_pool(feats, boxes, shapes)
    ref["mask_logits"] = net.roi_heads.mask_predictor(
        net.roi_heads.mask_head(ref["mask_pooled"]))
  ref["features"] = dict(zip(FPN_NAMES, levels))

  state = net.state_dict()
  assert not any(k.endswith("num_batches_tracked") for k in state)  # FrozenBN
  variables = convert.from_torch("maskrcnn_resnet50_fpn", state)
  model = MaskRCNNNetworks(num_classes=NUM_CLASSES)
  images = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
  rois = jnp.asarray(np.concatenate(BOXES), jnp.float32)
  rois_image = jnp.asarray(np.repeat([0, 1], [len(b) for b in BOXES]), jnp.int32)
  forward = jax.jit(lambda v, im: model.apply(v, im, rois, rois_image))
  ours = forward(variables, images)
  return dict(net=net, x=x, ref=ref, ours=ours, model=model, images=images,
              variables=variables, state=state, forward=forward, rois=rois,
              rois_image=rois_image)


def _check(name, ours, theirs, rtol=MASKRCNN_RTOL):
  err = relative_error(ours, theirs)
  print(f"{name}: rel err {err:.2e}")
  assert err <= rtol, (name, err)


def test_backbone_fpn_features(case):
  for name in FPN_NAMES:
    _check(name, case["ours"]["features"][name], nhwc(case["ref"]["features"][name]))


def test_rpn_head_outputs_and_their_anchors(case):
  ours, ref = case["ours"], case["ref"]
  _check("objectness", jnp.concatenate(ours["objectness"], 1), ref["objectness"])
  _check("rpn deltas", jnp.concatenate(ours["rpn_deltas"], 1), ref["rpn_deltas"])
  anchors = jnp.concatenate(ours["anchors"], 0)
  np.testing.assert_array_equal(anchors, ref["anchors"].numpy())
  # Each delta decodes against its own anchor, as in torchvision.
  proposals = jax.vmap(decode_boxes, (0, None))(jnp.concatenate(ours["rpn_deltas"], 1),
                                                anchors)
  _check("decoded proposals", proposals, ref["proposals"], DECODED_RTOL)


def test_roi_aligned_features(case):
  model, feats = case["model"], case["ours"]["features"]
  pool = jax.jit(lambda v, f, size: model.apply(
      v, f, case["rois"], case["rois_image"], size, method=model.pool),
                 static_argnums=2)
  _check("box pooled 7x7", pool(case["variables"], feats, 7),
         nhwc(case["ref"]["box_pooled"]))
  _check("mask pooled 14x14", pool(case["variables"], feats, 14),
         nhwc(case["ref"]["mask_pooled"]))


def test_box_and_mask_heads_end_to_end(case):
  ours, ref = case["ours"], case["ref"]
  _check("class logits", ours["class_logits"], ref["class_logits"])
  _check("box deltas", ours["box_deltas"], ref["box_deltas"])
  _check("mask logits", ours["mask_logits"], nhwc(ref["mask_logits"]))


def test_heads_on_identical_pooled_features(case):
  model, v, ref = case["model"], case["variables"], case["ref"]
  logits, deltas = jax.jit(lambda p: model.apply(v, p, method=model.box_outputs))(
      jnp.asarray(nhwc(ref["box_pooled"])))
  masks = jax.jit(lambda p: model.apply(v, p, method=model.mask_outputs))(
      jnp.asarray(nhwc(ref["mask_pooled"])))
  _check("class logits (same pooled)", logits, ref["class_logits"])
  _check("box deltas (same pooled)", deltas, ref["box_deltas"])
  _check("mask logits (same pooled)", masks, nhwc(ref["mask_logits"]))


def test_coco_v1_zero_eps_frozen_bn(case):
  """torchvision's COCO_V1 weights run FrozenBN with eps 0; frozen_bn_eps=0."""
  from torchvision.models.detection._utils import overwrite_eps
  body = copy.deepcopy(case["net"].backbone)
  # Tiny variances make the epsilon matter (1e-5 vs 0 changes their scale).
  body.body.bn1.running_var[:16] = 2e-5
  overwrite_eps(body, 0.0)
  with torch.no_grad():
    expected = list(body(case["x"]).values())
  state = dict(case["state"])
  state.update({f"backbone.{k}": v for k, v in body.state_dict().items()})
  for eps, close in ((0.0, True), (None, False)):
    variables = convert.from_torch("maskrcnn_resnet50_fpn", state, frozen_bn_eps=eps)
    feats = case["forward"](variables, case["images"])["features"]
    errs = [relative_error(feats[n], nhwc(e)) for n, e in zip(FPN_NAMES, expected)]
    print(f"frozen_bn_eps={eps}: max rel err {max(errs):.2e}")
    assert (max(errs) <= MASKRCNN_RTOL) == close


def test_fpn_alone_at_sizes_that_do_not_halve():
  """C5 3x4 under C4 6x7 etc.: nearest resize to the lateral's size."""
  from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
  generator = torch.Generator().manual_seed(3)
  channels, out = (8, 16, 24, 32), 16
  ref_fpn = torchvision.ops.FeaturePyramidNetwork(list(channels), out,
                                                  LastLevelMaxPool())
  with torch.no_grad():
    for p in ref_fpn.parameters():
      p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
  sizes = ((23, 27), (12, 14), (6, 7), (3, 4))
  inputs = [torch.randn(2, c, h, w, generator=generator)
            for c, (h, w) in zip(channels, sizes)]
  with torch.no_grad():
    expected = list(ref_fpn({str(i): t for i, t in enumerate(inputs)}).values())
  fpn = FeaturePyramidNetwork(out)
  feats = [jnp.asarray(nhwc(t)) for t in inputs]
  template = jax.eval_shape(lambda: fpn.init(jax.random.key(0), feats))
  variables = convert.apply_mapping(tv_convert.fpn_rows("", (), 4),
                                    convert.engine.to_numpy(ref_fpn.state_dict()),
                                    template)
  got = fpn.apply(variables, feats)
  assert len(got) == len(expected) == 5
  for i, (g, e) in enumerate(zip(got, expected)):
    _check(f"fpn level {i}", g, nhwc(e))
