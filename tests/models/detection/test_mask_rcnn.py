"""The whole Mask R-CNN: one compiled train step for any instance count,
gradients to exactly the trainable params, learning on a fixed batch, and
static-shape detection, on the TINY configuration at 64 x 96; Faster R-CNN
(masks=False) is the same detector less the mask branch."""
import functools

import numpy as np
import optax
import pytest
from flax import traverse_util

import jax
import jax.numpy as jnp

from segjax.errors import ConfigError
from segjax.models.detection.mask_rcnn import (TINY, VARIANTS, MaskRCNN, build_detector,
                                               train_losses, trainable_mask)
from segjax.models.detection.postprocess import paste_masks
from segjax.ops import box_iou

H, W = 64, 96
NUM_CLASSES = 4                 # background + 3
LOSSES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg",
          "loss_mask")
BOX_LOSSES = LOSSES[:4]  # Faster R-CNN's
# Per image, (x1, y1, x2, y2, class); G = 3 slots, the rest padding.
INSTANCES = ([(8, 6, 40, 38, 1), (50, 20, 90, 60, 2)], [(20, 10, 60, 50, 3)])


def make_key(seed):
  # rbg compiles faster than threefry on XLA:CPU; the stream is irrelevant.
  return jax.random.key(seed, impl="rbg")


CROP = 28                       # side of the GT mask crops
# The ellipse inscribed in a box, sampled at the crop pixels' centres
# (in box units; segjax.data.mask_crops' layout).
_CENTRES = (np.arange(CROP) + 0.5) / CROP
CROP_MASK = ((2 * _CENTRES[:, None] - 1) ** 2 + (2 * _CENTRES - 1) ** 2 <= 1).astype(np.uint8) * 255


def ellipse(box):
  """bool [H, W]: the pixels whose centre is in the ellipse inscribed in box."""
  x1, y1, x2, y2 = box
  yy, xx = np.mgrid[:H, :W] + 0.5
  return (((xx - (x1 + x2) / 2) / ((x2 - x1) / 2)) ** 2
          + ((yy - (y1 + y2) / 2) / ((y2 - y1) / 2)) ** 2) <= 1


def make_batch(instances=INSTANCES, g=3, seed=0):
  """Ellipse instances inside their boxes, painted in a class colour on noise;
  their masks as crops of the boxes, as the input pipeline gives them."""
  n = len(instances)
  rng = np.random.RandomState(seed)
  boxes = np.zeros((n, g, 4), np.float32)
  classes = np.zeros((n, g), np.int32)
  crops = np.zeros((n, g, CROP, CROP), np.uint8)
  images = (0.5 * rng.randn(n, H, W, 3)).astype(np.float32)
  for i, objs in enumerate(instances):
    for j, (x1, y1, x2, y2, c) in enumerate(objs):
      boxes[i, j], classes[i, j], crops[i, j] = (x1, y1, x2, y2), c, CROP_MASK
      images[i][ellipse(boxes[i, j])] += 2.0 * np.eye(3, dtype=np.float32)[c - 1]
  return {"image": images, "image_size": np.array([[H, W], [60, 90]][:n], np.int32),
          "boxes": boxes, "classes": classes, "mask_crops": crops, "mask_boxes": boxes,
          "valid": classes > 0}


def random_instances(counts, seed):
  rng = np.random.RandomState(seed)
  out = []
  for k in counts:
    objs = []
    for _ in range(k):
      x1, y1 = rng.randint(0, W - 30), rng.randint(0, H - 30)
      objs.append((x1, y1, x1 + rng.randint(8, 30), y1 + rng.randint(8, 30),
                   rng.randint(1, NUM_CLASSES)))
    out.append(objs)
  return out


class Built:
  """A model, its variables (given, or initialised), and its jitted loss
  gradient with a trace counter."""

  def __init__(self, name, variables=None):
    self.model = build_detector(name, NUM_CLASSES, **TINY)
    self.variables = variables or jax.jit(self.model.init)(make_key(0),
                                                           jnp.zeros((2, H, W, 3)))
    self.traces = 0

    def loss(params, batch, rng):
      self.traces += 1          # runs only while jax traces
      out, updates = train_losses(self.model, {**self.variables, "params": params}, batch, rng)
      assert updates == {}      # frozen BN: nothing to update
      return out["loss"], out

    self.grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    self.detect = jax.jit(self.model.apply)


@pytest.fixture(scope="module")
def fpn():
  return Built("mask_rcnn_r50_fpn")


def check_losses(out, names=LOSSES):
  assert set(out) == set(names) | {"loss"}
  for k, v in out.items():
    assert v.shape == () and v.dtype == jnp.float32 and np.isfinite(v), k
  np.testing.assert_allclose(out["loss"], sum(out[k] for k in names), rtol=1e-6)


def check_gradients(built, grads):
  """Non-zero gradient exactly where trainable_mask says a param trains."""
  mask = traverse_util.flatten_dict(trainable_mask(built.model, built.variables["params"]))
  flat = traverse_util.flatten_dict(grads)
  assert flat.keys() == mask.keys()
  wrong = [k for k, g in flat.items() if bool(np.any(np.asarray(g) != 0)) != mask[k]]
  assert not wrong, wrong
  return mask


def test_train_step_compiles_once_for_any_instance_count(fpn):
  batches = [make_batch(), make_batch(random_instances([3, 0], 1), seed=1),
             make_batch([[], []], seed=2)]
  outs = []
  for i, batch in enumerate(batches):
    (_, out), _ = fpn.grad(fpn.variables["params"], batch, make_key(i))
    check_losses(out)
    outs.append(out)
  assert fpn.traces == 1 and fpn.grad._cache_size() == 1
  # Without any instance nothing is positive: no box, mask or RPN box loss.
  for k in ("loss_rpn_box_reg", "loss_box_reg", "loss_mask"):
    assert outs[2][k] == 0.0
    assert outs[0][k] > 0.0
  # Freshly initialised classifiers start near chance.
  np.testing.assert_allclose(outs[0]["loss_objectness"], np.log(2), rtol=0.05)
  np.testing.assert_allclose(outs[0]["loss_classifier"], np.log(NUM_CLASSES), rtol=0.1)


def test_gradients_reach_exactly_the_trainable_params(fpn):
  (_, _), grads = fpn.grad(fpn.variables["params"], make_batch(), make_key(0))
  mask = check_gradients(fpn, grads)
  frozen = {k for k, m in mask.items() if not m}
  # torchvision's defaults: conv1 and layer1 frozen (3 trainable layers) and
  # every FrozenBatchNorm2d affine; FPN, RPN and heads all train.
  assert ("backbone", "body", "conv1", "kernel") in frozen
  assert ("backbone", "body", "layer1_0", "conv1", "kernel") in frozen
  assert ("backbone", "body", "layer2_0", "bn1", "scale") in frozen
  assert ("backbone", "body", "layer2_0", "conv1", "kernel") not in frozen
  assert all(k[0] != "backbone" or k[1] == "body" for k in frozen)


def test_sgd_on_a_fixed_batch_learns_to_detect(fpn):
  batch, rng = make_batch(), make_key(0)
  params = fpn.variables["params"]
  tx = optax.sgd(0.02, momentum=0.9)
  state = tx.init(params)

  @jax.jit
  def apply_sgd(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  losses = []
  for _ in range(60):
    (loss, _), grads = fpn.grad(params, batch, rng)
    params, state = apply_sgd(grads, state, params)
    losses.append(float(loss))
  assert fpn.traces == 1
  assert np.mean(losses[-5:]) < 0.5 * losses[0], losses
  # The top detection of each image is one of its objects: box, class, mask.
  det = fpn.detect({**fpn.variables, "params": params}, batch["image"], batch["image_size"])
  for i in range(2):
    gt = np.flatnonzero(batch["valid"][i])
    iou = np.asarray(box_iou(jnp.asarray(batch["boxes"][i, gt]), det["boxes"][i, :1]))[:, 0]
    j = gt[np.argmax(iou)]
    assert det["valid"][i, 0] and iou.max() > 0.5, iou
    assert det["classes"][i, 0] == batch["classes"][i, j]
    m, g = np.asarray(det["masks"][i, 0]), ellipse(batch["boxes"][i, j])
    assert (m & g).sum() / (m | g).sum() > 0.5


def test_detection_outputs(fpn):
  batch = make_batch()
  det = fpn.detect(fpn.variables, batch["image"], batch["image_size"])
  d, sizes = TINY["box_detections_per_img"], batch["image_size"]
  assert det["boxes"].shape == (2, d, 4) and det["classes"].dtype == jnp.int32
  assert det["mask_probs"].shape == (2, d, 28, 28) and det["masks"].shape == (2, d, H, W)
  assert det["masks"].dtype == jnp.bool_
  valid = np.asarray(det["valid"])
  assert valid.any()
  for i in range(2):
    h, w = sizes[i]
    b = np.asarray(det["boxes"][i])[valid[i]]
    assert (b >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
    s = np.asarray(det["scores"][i])[valid[i]]
    assert (s > 0.05).all() and (np.diff(s) <= 0).all()
    assert not np.asarray(det["masks"][i, :, h:]).any()
    assert not np.asarray(det["masks"][i, :, :, w:]).any()
  assert not np.asarray(det["masks"])[~valid].any()
  pasted = jax.jit(paste_masks, static_argnums=2)(det["mask_probs"], det["boxes"], (H, W),
                                                  sizes, det["valid"])
  np.testing.assert_array_equal(pasted, det["masks"])
  no_paste = jax.eval_shape(functools.partial(fpn.model.apply, paste=False), fpn.variables,
                            batch["image"], batch["image_size"])
  assert set(no_paste) == set(det) - {"masks"}


def test_c4_variant_trains_and_detects():
  c4 = Built("mask_rcnn_r50_c4")
  (_, out), grads = c4.grad(c4.variables["params"], make_batch(), make_key(0))
  check_losses(out)
  mask = check_gradients(c4, grads)
  assert not mask[("res5", "layer4_0", "bn1", "scale")]
  assert mask[("res5", "layer4_0", "conv1", "kernel")]
  det = c4.detect(c4.variables, make_batch()["image"])
  assert det["mask_probs"].shape[2:] == (14, 14) and det["masks"].shape[2:] == (H, W)


def test_faster_rcnn_is_mask_rcnn_less_the_mask_branch(fpn):
  """Mask R-CNN's params less mask_head are Faster R-CNN's; with them, on the
  same batch and key, its four other losses come out the same, with no need
  of the batch's masks, and gradients reach exactly the trainable params."""
  shared = {**fpn.variables, "params": {k: v for k, v in fpn.variables["params"].items()
                                        if k != "mask_head"}}
  faster = Built("faster_rcnn_r50_fpn", shared)
  own = jax.eval_shape(faster.model.init, make_key(0), jnp.zeros((2, H, W, 3)))
  assert jax.tree_util.tree_structure(own) == jax.tree_util.tree_structure(shared)
  batch = make_batch()
  (_, out), grads = faster.grad(shared["params"],
                                {k: v for k, v in batch.items() if k != "masks"}, make_key(0))
  check_losses(out, BOX_LOSSES)
  check_gradients(faster, grads)
  (_, mask_out), _ = fpn.grad(fpn.variables["params"], batch, make_key(0))
  for k in BOX_LOSSES:
    np.testing.assert_allclose(out[k], mask_out[k], rtol=1e-5, err_msg=k)
  det = jax.eval_shape(faster.model.apply, shared, batch["image"], batch["image_size"])
  assert set(det) == {"boxes", "scores", "classes", "valid"}


def test_c4_faster_rcnn_has_no_mask_branch():
  """Traced only (the C4 box path is the one test_c4_variant_trains_and_detects runs)."""
  model = build_detector("faster_rcnn_r50_c4", NUM_CLASSES, **TINY)
  variables = jax.eval_shape(model.init, make_key(0), jnp.zeros((2, H, W, 3)))
  assert "mask_head" not in variables["params"] and "res5" in variables["params"]
  batch = {k: v for k, v in make_batch().items() if k != "masks"}
  out, _ = jax.eval_shape(lambda v: train_losses(model, v, batch, make_key(0)), variables)
  assert set(out) == set(BOX_LOSSES) | {"loss"}
  det = jax.eval_shape(model.apply, variables, batch["image"], batch["image_size"])
  assert set(det) == {"boxes", "scores", "classes", "valid"}


def test_build_variants_and_options():
  for name, spec in VARIANTS.items():
    model = build_detector(name, 91)
    assert isinstance(model, MaskRCNN) and model.num_classes == 91
    assert model.layout == spec["layout"] and model.stage_sizes == spec["stage_sizes"]
    assert model.masks == name.startswith("mask_rcnn_")
  assert {n.replace("faster_", "mask_") for n in VARIANTS if n.startswith("faster_")} == {
      n for n in VARIANTS if n.startswith("mask_")}
  assert build_detector("mask_rcnn_r101_fpn", 3).stage_sizes == (3, 4, 23, 3)
  assert build_detector("mask_rcnn_r50_fpn", 3, rpn_post_nms_top_n_train=7
                         ).rpn_post_nms_top_n_train == 7
  with pytest.raises(ConfigError, match="mask_rcnn_r50_fpn"):
    build_detector("mask_rcnn_r18", 3)
  with pytest.raises(ConfigError, match="no option"):
    build_detector("mask_rcnn_r50_fpn", 3, rpn_nms=0.5)
  with pytest.raises(ConfigError):
    build_detector("mask_rcnn_r50_fpn", 3, trainable_backbone_layers=6)
  # The name says whether there are masks: the task trains and scores by it.
  with pytest.raises(ConfigError, match="no option"):
    build_detector("faster_rcnn_r50_fpn", 3, masks=True)


@pytest.mark.parametrize("layers,frozen_bn", [(5, True), (0, True), (5, False)])
def test_trainable_mask_options(layers, frozen_bn):
  model = build_detector("mask_rcnn_r50_fpn", 3, trainable_backbone_layers=layers,
                          frozen_bn=frozen_bn, **TINY)
  shapes = jax.eval_shape(model.init, make_key(0), jnp.zeros((1, H, W, 3)))
  mask = traverse_util.flatten_dict(trainable_mask(model, shapes["params"]))
  body = {k: m for k, m in mask.items() if k[:2] == ("backbone", "body")}
  rest = [m for k, m in mask.items() if k[:2] != ("backbone", "body")]
  assert all(rest)              # FPN, RPN and heads always train
  for k, m in body.items():
    is_bn = k[-1] == "scale" or "bn" in k[-2]
    assert m == (layers == 5 and not (frozen_bn and is_bn)), k
