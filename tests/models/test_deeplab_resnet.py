"""DeepLab v2 / v3 / v3+ (segjax.models.deeplab_resnet): the papers' structure.

The generic contract (shapes, gradients, batch_stats) is in test_contract.py.
Here: ASPP-L is four summed atrous branches at rates 6..24; v3's ASPP rates
follow the output stride and it has the image pooling branch; v3+'s decoder
reads the stride-4 features; the CRF option; and each model learns a toy
task.

Params come from `numpy_init` (eval_shape + numpy He-normal draws): XLA:CPU
takes ~7 s to compile a jitted Flax init of even the tiny ResNets, mostly for
the random-number ops, and these tests only need *some* reasonable weights.
"""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import models
from segjax.errors import ConfigError

from learning import train_losses  # pylint: disable=import-error
from segjax.models import deeplab_resnet

NUM_CLASSES = 3
# One block per stage and width 4: every layer type of the paper models,
# small enough to compile and train in seconds on one CPU core.
TINY = dict(stage_sizes=(1, 1, 1, 1), width=4)
TINY_V3 = dict(TINY, multi_grid=None, aspp_channels=12)
TINY_V3_PLUS = dict(TINY_V3, low_level_channels=6, decoder_channels=10)
# Adam steps in which the learning tests must cut the loss by 90 %.
STEPS = 100


def numpy_init(model, shape, seed=0, **kwargs):
  """Variables for `model` on inputs of `shape`, drawn with numpy.

  Kernels He-normal (fan in), biases 0, BN scale 1, bias 0, mean 0, var 1.
  """
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0, impl="rbg"), jnp.zeros(shape), **kwargs))
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = path[-1].key
    if name == "kernel":
      fan_in = math.prod(s.shape[:-1])
      return rng.normal(0, math.sqrt(2 / fan_in), s.shape).astype(np.float32)
    fill = 1.0 if name in ("scale", "var") else 0.0
    return np.full(s.shape, fill, np.float32)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def capture(model, variables, images, **kwargs):
  """(outputs, intermediates): every submodule's __call__ output, eval mode."""
  outputs, state = jax.jit(lambda v, x: model.apply(
      v, x, capture_intermediates=True, mutable=["intermediates"],
      **kwargs))(variables, images)
  return outputs, state["intermediates"]


def convs(fn, *args):
  """[(rhs_dilation, kernel HWIO shape)] of every conv `fn` traces."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        found.append((tuple(eqn.params["rhs_dilation"]),
                      tuple(eqn.invars[1].aval.shape)))
      for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else [param]:
          sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
          if hasattr(sub, "eqns"):
            walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def random_images(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ----------------------------------------------------------------------------
# DeepLab v2: ASPP-L.


def test_deeplab_v2_aspp_l_is_four_summed_atrous_branches():
  c, k = 4, 2
  module = deeplab_resnet.ASPPL(k)
  x = random_images((1, 53, 53, c))
  variables = numpy_init(module, x.shape)
  params = variables["params"]
  assert sorted(params) == ["c0", "c1", "c2", "c3"]  # fc1_voc12_c0..c3
  for branch in params.values():
    assert branch["kernel"].shape == (3, 3, c, k)
    assert branch["bias"].shape == (k,)  # bias, and no BN
  params = jax.tree_util.tree_map(  # non-zero biases, to check them too
      lambda p: p + 0.5 if p.ndim == 1 else p, params)
  apply = jax.jit(module.apply)
  full = apply({"params": params}, x)

  def only(i):
    return {f"c{j}": (b if j == i else jax.tree_util.tree_map(
        np.zeros_like, b)) for j, b in enumerate(params.values())}

  # Each branch alone is a plain 3x3 conv with dilation = padding = rate.
  singles = []
  for i, rate in enumerate((6, 12, 18, 24)):
    got = apply({"params": only(i)}, x)
    want = jax.lax.conv_general_dilated(
        x, params[f"c{i}"]["kernel"], (1, 1), ((rate, rate), (rate, rate)),
        rhs_dilation=(rate, rate),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision="highest") + params[f"c{i}"]["bias"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    singles.append(got)
  # ... and the module is their sum (not a concatenation or a max).
  np.testing.assert_allclose(full, sum(singles), rtol=1e-4, atol=1e-4)
  # The impulse response reaches exactly the offsets {0, +-rate} per axis.
  ones = jax.tree_util.tree_map(np.ones_like, params)
  ones = {n: {"kernel": b["kernel"], "bias": 0 * b["bias"]}
          for n, b in ones.items()}
  delta = np.zeros((1, 53, 53, c), np.float32)
  delta[0, 26, 26] = 1
  hit = np.abs(np.asarray(apply({"params": ones}, delta))[0, ..., 0]) > 0
  offsets = {(i - 26, j - 26) for i, j in zip(*np.nonzero(hit))}
  assert offsets == {(a * r, b * r) for r in (6, 12, 18, 24)
                     for a in (-1, 0, 1) for b in (-1, 0, 1)}


def test_deeplab_v2_is_resnet_at_os8_with_aspp_l_on_c5():
  model = models.build("deeplab_v2", NUM_CLASSES, **TINY)
  # Default: ResNet-101 (the partial above shrinks it).
  assert models.build("deeplab_v2", 2).stage_sizes == (3, 4, 23, 3)
  images = random_images((2, 64, 64, 3))
  variables = numpy_init(model, images.shape)
  outputs, inter = capture(model, variables, images)
  assert outputs["logits"].shape == (2, 64, 64, NUM_CLASSES)
  assert outputs["logits"].dtype == jnp.float32
  c5 = inter["backbone"]["__call__"][0]["c5"]
  assert c5.shape == (2, 8, 8, 32 * TINY["width"])  # output stride 8
  assert inter["aspp"]["__call__"][0].shape == (2, 8, 8, NUM_CLASSES)
  # The four classifier convs read C5 at rates 6, 12, 18, 24.
  head = [d for d, s in convs(lambda v: model.apply(v, images), variables)
          if s == (3, 3, c5.shape[-1], NUM_CLASSES)]
  assert sorted(head) == [(6, 6), (12, 12), (18, 18), (24, 24)]


def test_deeplab_v2_crf():
  kwargs = dict(TINY, crf=True)
  model = models.build("deeplab_v2", NUM_CLASSES, **kwargs)
  images = random_images((2, 32, 32, 3))  # noise: a speckled RGB image
  variables = numpy_init(model, images.shape)
  apply = jax.jit(lambda v, x, **kw: model.apply(v, x, **kw))
  outputs = apply(variables, images)
  logits, unary = outputs["logits"], outputs["unary_logits"]
  assert logits.shape == unary.shape == (2, 32, 32, NUM_CLASSES)
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
  # Log-marginals: they exponentiate to distributions.
  np.testing.assert_allclose(np.exp(logits).sum(-1), 1, atol=1e-4)
  # The CRF relabels some pixels of the CNN's prediction.
  changed = np.mean(np.argmax(logits, -1) != np.argmax(unary, -1))
  assert changed > 0.01, changed
  # Its image is the de-normalised input ...
  rgb = images * np.float32(deeplab_resnet.IMAGENET_STD) + np.float32(
      deeplab_resnet.IMAGENET_MEAN)
  again = jax.jit(lambda v, x, r: model.apply(v, x, crf_image=r))(
      variables, images, rgb)
  # (Probabilities, loosely: the mean field amplifies float noise in the
  # image at near-ties.)
  np.testing.assert_allclose(np.exp(again["logits"]), np.exp(logits),
                             atol=1e-2)
  # ... and training never runs it.
  train, _ = jax.jit(lambda v, x: model.apply(
      v, x, train=True, mutable=["batch_stats"]))(variables, images)
  assert set(train) == {"logits"}
  with pytest.raises(ConfigError, match="crf_kwargs"):
    models.build("deeplab_v2", 2, crf=True, crf_kwargs={"sxy": 3})


# ----------------------------------------------------------------------------
# DeepLab v3: ASPP with image pooling; rates follow the output stride.


@pytest.mark.parametrize("output_stride,rates", [(16, (6, 12, 18)),
                                                 (8, (12, 24, 36))])
def test_deeplab_v3_rates_follow_output_stride(output_stride, rates):
  model = models.build("deeplab_v3", NUM_CLASSES, output_stride=output_stride,
                       aux=True, **TINY_V3)
  assert model.atrous_rates == rates
  images = random_images((2, 64, 64, 3))
  variables = numpy_init(model, images.shape)
  outputs, inter = capture(model, variables, images)
  assert outputs["logits"].shape == (2, 64, 64, NUM_CLASSES)
  assert outputs["aux"][0].shape == (2, 64, 64, NUM_CLASSES)
  side = 64 // output_stride
  c5 = inter["backbone"]["__call__"][0]["c5"]
  assert c5.shape == (2, side, side, 32 * TINY["width"])
  aspp = inter["aspp"]
  for i in range(4):  # 1x1 and three atrous branches at C5's size
    assert aspp[f"convs_{i}"]["__call__"][0].shape == (2, side, side, 12)
  # Image pooling: 1x1 conv + BN + ReLU on the global mean, then broadcast.
  assert variables["params"]["aspp"]["convs_4"]["conv"]["kernel"].shape == (
      1, 1, c5.shape[-1], 12)
  assert "bn" in variables["params"]["aspp"]["convs_4"]
  assert aspp["convs_4"]["__call__"][0].shape == (2, 1, 1, 12)
  assert aspp["project"]["__call__"][0].shape == (2, side, side, 12)
  assert variables["params"]["aspp"]["project"]["conv"]["kernel"].shape == (
      1, 1, 5 * 12, 12)
  # The paper's head: ASPP -> 1x1 to classes (no extra 3x3 conv).
  assert variables["params"]["classifier"]["kernel"].shape == (
      1, 1, 12, NUM_CLASSES)
  atrous = [d for d, s in convs(lambda v: model.apply(v, images), variables)
            if s == (3, 3, c5.shape[-1], 12)]
  assert sorted(atrous) == [(r, r) for r in rates]


def test_deeplab_v3_options():
  assert models.build("deeplab_v3", 2, rates=(3, 5, 7)).atrous_rates == (
      3, 5, 7)
  model = models.build("deeplab_v3", 2)
  assert (model.output_stride, tuple(model.multi_grid), model.stage_sizes) == (
      16, (1, 2, 4), (3, 4, 23, 3))
  # Multi-grid (1, 2, 4) on the last stage: rates 2, 4, 8 at OS 16.
  model = models.build("deeplab_v3", 2, **dict(TINY_V3, multi_grid=(1, 2, 4),
                                                stage_sizes=(1, 1, 1, 3)))
  images = np.zeros((1, 32, 32, 3), np.float32)
  variables = numpy_init(model, images.shape)
  layer4 = [d for d, s in convs(lambda v: model.apply(v, images), variables)
            if s == (3, 3, 8 * TINY["width"], 8 * TINY["width"])]
  assert layer4 == [(2, 2), (4, 4), (8, 8)]
  with pytest.raises(ConfigError, match="output_stride"):
    models.build("deeplab_v3", 2, output_stride=32)
  with pytest.raises(ConfigError, match="rates"):
    models.build("deeplab_v3_plus", 2, rates=(6, 12))
  with pytest.raises(ConfigError, match="multi_grid"):
    models.build("deeplab_v3", 2, stage_sizes=(1, 1, 1, 1))


# ----------------------------------------------------------------------------
# DeepLab v3+: the decoder reads the stride-4 features.


def test_deeplab_v3_plus_decoder_uses_stride4_features():
  model = models.build("deeplab_v3_plus", NUM_CLASSES, **TINY_V3_PLUS)
  images = random_images((2, 64, 64, 3))
  variables = numpy_init(model, images.shape)
  params = variables["params"]
  assert "classifier" not in params  # the decoder's replaces v3's
  c2_channels = 4 * TINY["width"]  # C3 would have 8 * width
  assert params["decoder"]["reduce"]["conv"]["kernel"].shape == (
      1, 1, c2_channels, 6)
  assert params["decoder"]["fuse_0"]["conv"]["kernel"].shape == (
      3, 3, 12 + 6, 10)
  assert params["decoder"]["fuse_1"]["conv"]["kernel"].shape == (3, 3, 10, 10)
  outputs, inter = capture(model, variables, images)
  features = inter["backbone"]["__call__"][0]
  assert features["c2"].shape[1:3] == (16, 16)
  assert features["c5"].shape[1:3] == (4, 4)  # OS 16
  decoder = inter["decoder"]
  assert decoder["reduce"]["__call__"][0].shape == (2, 16, 16, 6)
  assert decoder["fuse_1"]["__call__"][0].shape == (2, 16, 16, 10)
  assert decoder["__call__"][0].shape == (2, 16, 16, NUM_CLASSES)
  assert outputs["logits"].shape == (2, 64, 64, NUM_CLASSES)
  # The low-level path matters: zeroing its reduction changes the logits.
  cut = jax.tree_util.tree_map(lambda x: x, params)
  cut["decoder"]["reduce"]["conv"]["kernel"] = np.zeros_like(
      params["decoder"]["reduce"]["conv"]["kernel"])
  cut_logits = jax.jit(model.apply)({**variables, "params": cut}, images)
  assert not np.allclose(cut_logits["logits"], outputs["logits"])


def test_deeplab_v3_plus_bfloat16_compute_and_bn_axis_name():
  model = models.build("deeplab_v3_plus", NUM_CLASSES, **TINY_V3_PLUS)
  images = random_images((2, 32, 32, 3))
  variables = numpy_init(model, images.shape)
  model16 = models.build("deeplab_v3_plus", NUM_CLASSES, dtype="bfloat16",
                         **TINY_V3_PLUS)
  # The same float32 params drive the bfloat16 model; logits stay float32.
  want = jax.jit(model.apply)(variables, images)["logits"]
  got = jax.jit(model16.apply)(variables, images)["logits"]
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=0.1 * np.abs(want).max())
  for name, kwargs in (("deeplab_v2", TINY), ("deeplab_v3", TINY_V3)):
    model = models.build(name, 2, bn_axis_name="batch", **kwargs)
    # Outside pmap the axis is unbound, so BatchNorm must be asking for it.
    variables = numpy_init(model, images.shape)
    with pytest.raises(NameError, match="batch"):
      jax.eval_shape(lambda: model.apply(variables, images, train=True,
                                         mutable=["batch_stats"]))


def test_deeplab_v3_frozen_bn_keeps_backbone_statistics():
  model = models.build("deeplab_v3", NUM_CLASSES, frozen_bn=True, **TINY_V3)
  images = random_images((2, 32, 32, 3))
  variables = numpy_init(model, images.shape)
  _, state = jax.jit(lambda v, x: model.apply(
      v, x, train=True, mutable=["batch_stats"],
      rngs={"dropout": jax.random.key(0, impl="rbg")}))(variables, images)
  before, after = variables["batch_stats"], state["batch_stats"]
  # Structure and values: statistics that lost a leaf fail too.
  chex.assert_trees_all_equal(after["backbone"], before["backbone"])
  # The head's BatchNorms still train.
  assert not np.allclose(before["aspp"]["project"]["bn"]["mean"],
                         after["aspp"]["project"]["bn"]["mean"])


# ----------------------------------------------------------------------------
# It learns.


def squares_batch(size=64, seed=0):
  """2 noisy images, each with a class-1 and a class-2 square on class 0.

  The squares lie on a 16-pixel grid: at output stride 16 every logit cell
  is then pure, so bilinear upsampling can fit the labels exactly.
  """
  rng = np.random.default_rng(seed)
  images = rng.normal(scale=0.3, size=(2, size, size, 3)).astype(np.float32)
  labels = np.zeros((2, size, size), np.int32)
  boxes = [((0, 16, 16, 32), (32, 64, 16, 48)),
           ((32, 48, 0, 32), (0, 32, 32, 64))]
  for i, image_boxes in enumerate(boxes):
    for cls, (y0, y1, x0, x1) in enumerate(image_boxes, 1):
      labels[i, y0:y1, x0:x1] = cls
      images[i, y0:y1, x0:x1, cls] += 1.5
  return images, labels


@pytest.mark.parametrize("name,kwargs", [
    ("deeplab_v2", TINY),
    ("deeplab_v3", TINY_V3),
    ("deeplab_v3_plus", TINY_V3_PLUS),
    # torchvision's layouts (their ResNet-101 variants are the same modules).
    ("fcn_resnet50", dict(stage_sizes=(1, 1, 1, 1), width=8)),
    ("deeplab_v3_resnet50", dict(stage_sizes=(1, 1, 1, 1), width=8)),
], ids=["deeplab_v2", "deeplab_v3", "deeplab_v3_plus", "fcn_resnet50",
        "deeplab_v3_resnet50"])
def test_learns_squares(name, kwargs):
  images, labels = squares_batch()
  model = models.build(name, NUM_CLASSES, **kwargs)
  variables = numpy_init(model, images.shape)
  history = train_losses(model, images, labels, STEPS, 1e-2, variables)
  assert history[-1] <= 0.1 * history[0], history[::10]

