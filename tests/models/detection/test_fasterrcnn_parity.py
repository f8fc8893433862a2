"""Parity of Faster R-CNN (MaskRCNN with masks=False) with torchvision's
fasterrcnn_resnet50_fpn.

A randomly initialised torchvision model (torchvision_random) is converted
with segjax.convert ("fasterrcnn_resnet50_fpn", maskrcnn_resnet50_fpn's
rows less the mask branch) and both run in eval mode on the same
2 x 160 x 224 batch: P2-P6, the RPN head's flattened objectness and deltas
and their anchors, and the box head on the same ROIs (MaskRCNNNetworks);
then the whole detector on the images alone (MaskRCNN.__call__ against
torchvision's forward): proposals, box head, post-processing, the same
detections in the same order.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import needs
from segjax import convert
from segjax.models.detection.mask_rcnn import MaskRCNN
from segjax.models.detection.networks import MaskRCNNNetworks

torch = needs("torch")
torchvision = needs("torchvision")
# pylint: disable=wrong-import-position,import-error
from torchvision_random import nhwc, random_detector, relative_error  # noqa: E402

# Features, RPN and box head outputs on the same ROIs: as the Mask R-CNN
# test's (measured here: at most 3.2e-6).
RTOL = 1e-5
# End to end, detection scores and boxes: 4.5e-6 and 1.2e-6 here, at most
# 1.2e-5 and 4.0e-6 over five seeds of the model and images (a softmax
# score moves with its logits' error), with labels and order equal in all.
DETECTION_RTOL = 3e-5
NUM_CLASSES = 5
IMAGE = (160, 224)
# Proposals per level before NMS and per image after it, in both detectors:
# half and a third of torchvision's 1000 and 1000, since segjax's
# static-shape NMS over them is most of this file's run time on a CPU.
PROPOSALS = dict(rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=300)
# (x1, y1, x2, y2) per image: every FPN level from P2 to P5, some past the image.
ROIS = ([[10., 20., 60., 50.], [0., 0., 224., 160.], [-60., -80., 300., 250.],
         [50., 60., 54., 63.]],
        [[5., 5., 120., 150.], [30., 40., 90., 45.], [0., 0., 30., 30.]])
FPN_NAMES = ("p2", "p3", "p4", "p5", "p6")


@pytest.fixture(scope="module", autouse=True)
def highest_precision():
  """Full float32 matmuls and convolutions, as PyTorch's CPU kernels do
  (see test_maskrcnn_parity.py)."""
  with jax.default_matmul_precision("highest"):
    yield


def _rescale(layer, std, target):
  """Scales a layer's weight and bias so its outputs' std becomes `target`."""
  with torch.no_grad():
    layer.weight.mul_(target / std)
    layer.bias.mul_(target / std)


def _calibrate(net, x, feats):
  """Brings the random heads' outputs to a trained detector's scale.

  With random weights the objectness and class logits are in the hundreds,
  so every score is 1.0 (ties, which any order may break), and the deltas
  too, so boxes decode far outside the image and clip flat: nothing to
  compare. Logits with std 2 and deltas with std 0.5 give 100 distinct
  detections per image. feats: net.backbone(x), which this leaves as is.
  """
  from torchvision.models.detection.rpn import concat_box_prediction_layers
  with torch.no_grad():
    objectness, deltas = concat_box_prediction_layers(*net.rpn.head(list(feats.values())))
    _rescale(net.rpn.head.cls_logits, objectness.std(), 2.0)
    _rescale(net.rpn.head.bbox_pred, deltas.std(), 0.5)
    proposals, _ = net.rpn(net.transform(list(x))[0], feats)
    pooled = net.roi_heads.box_roi_pool(feats, proposals, [IMAGE] * len(x))
    logits, deltas = net.roi_heads.box_predictor(net.roi_heads.box_head(pooled))
    _rescale(net.roi_heads.box_predictor.cls_score, logits.std(), 2.0)
    _rescale(net.roi_heads.box_predictor.bbox_pred, deltas.std(), 0.5)


@pytest.fixture(scope="module")
def case():
  """torchvision's and our outputs on the same images (and ROIs)."""
  from torchvision.models.detection import fasterrcnn_resnet50_fpn
  from torchvision.models.detection.image_list import ImageList
  from torchvision.models.detection.rpn import concat_box_prediction_layers
  # Sizes and normalisation that leave the batch as it is: segjax's
  # detector takes images already resized and normalised.
  net, generator = random_detector(
      fasterrcnn_resnet50_fpn, NUM_CLASSES, min_size=IMAGE[0], max_size=IMAGE[1],
      image_mean=[0.0] * 3, image_std=[1.0] * 3, **PROPOSALS)
  x = torch.randn(2, 3, *IMAGE, generator=generator)
  rois = [torch.tensor(b) for b in ROIS]
  shapes = [IMAGE] * 2
  ref = {}
  with torch.no_grad():
    transformed = net.transform(list(x))[0]
    assert torch.equal(transformed.tensors, x)
    feats = net.backbone(x)
    _calibrate(net, x, feats)
    levels = list(feats.values())
    obj, dl = concat_box_prediction_layers(*net.rpn.head(levels))
    ref["objectness"], ref["rpn_deltas"] = obj.reshape(2, -1), dl.reshape(2, -1, 4)
    ref["anchors"] = net.rpn.anchor_generator(ImageList(x, shapes), levels)[0]
    ref["class_logits"], box_deltas = net.roi_heads.box_predictor(
        net.roi_heads.box_head(net.roi_heads.box_roi_pool(feats, rois, shapes)))
    ref["box_deltas"] = box_deltas.reshape(-1, NUM_CLASSES, 4)
    ref["detections"] = net(list(x))
  ref["features"] = dict(zip(FPN_NAMES, levels))

  state = net.state_dict()
  assert not any(k.startswith("roi_heads.mask") for k in state)
  variables = convert.from_torch("fasterrcnn_resnet50_fpn", state)
  images = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
  networks = MaskRCNNNetworks(num_classes=NUM_CLASSES, masks=False)
  flat_rois = jnp.asarray(np.concatenate(ROIS), jnp.float32)
  rois_image = jnp.asarray(np.repeat([0, 1], [len(b) for b in ROIS]), jnp.int32)
  ours = jax.jit(lambda v, im: networks.apply(v, im, flat_rois, rois_image))(
      variables, images)
  detector = MaskRCNN(num_classes=NUM_CLASSES, masks=False, **PROPOSALS)
  detections = jax.device_get(jax.jit(detector.apply)(variables, images))
  return dict(ref=ref, ours=ours, variables=variables, detections=detections)


def _check(name, ours, theirs, rtol=RTOL):
  err = relative_error(ours, theirs)
  print(f"{name}: rel err {err:.2e}")
  assert err <= rtol, (name, err)


def test_converted_variables_have_no_mask_head(case):
  assert "mask_head" not in case["variables"]["params"]
  assert "mask_logits" not in case["ours"]


def test_backbone_fpn_features(case):
  for name in FPN_NAMES:
    _check(name, case["ours"]["features"][name], nhwc(case["ref"]["features"][name]))


def test_rpn_head_outputs_and_their_anchors(case):
  ours, ref = case["ours"], case["ref"]
  _check("objectness", jnp.concatenate(ours["objectness"], 1), ref["objectness"])
  _check("rpn deltas", jnp.concatenate(ours["rpn_deltas"], 1), ref["rpn_deltas"])
  np.testing.assert_array_equal(jnp.concatenate(ours["anchors"], 0),
                                ref["anchors"].numpy())


def test_box_head_on_the_same_rois(case):
  ours, ref = case["ours"], case["ref"]
  _check("class logits", ours["class_logits"], ref["class_logits"])
  _check("box deltas", ours["box_deltas"], ref["box_deltas"])


def test_end_to_end_detections(case):
  """Same images in, same detections out: count, labels and order equal,
  scores and boxes to DETECTION_RTOL."""
  ours = case["detections"]
  assert set(ours) == {"boxes", "scores", "classes", "valid"}
  for i, theirs in enumerate(case["ref"]["detections"]):
    n = len(theirs["scores"])
    assert n > 50 and int(ours["valid"][i].sum()) == n
    np.testing.assert_array_equal(ours["classes"][i][:n], theirs["labels"].numpy())
    _check(f"image {i} scores", ours["scores"][i][:n], theirs["scores"], DETECTION_RTOL)
    _check(f"image {i} boxes", ours["boxes"][i][:n], theirs["boxes"], DETECTION_RTOL)
