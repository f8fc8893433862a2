"""Mask R-CNN networks: FPN, RPN / box / mask heads, both layouts (no torch).

Numbers against numpy written from torchvision's definitions (flatten order
of fc6, ConvTranspose2d, permute_and_flatten); shapes by eval_shape; one
jitted forward and backward of tiny networks. Parity with torchvision
itself is tests/models/detection/test_maskrcnn_parity.py.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from segjax import convert
from segjax.errors import CheckpointError, ConfigError
from segjax.models.detection import heads
from segjax.models.detection.fpn import FeaturePyramidNetwork
from segjax.models.detection.networks import LAYOUTS, MaskRCNNNetworks
from segjax.ops import anchor_grid, cell_anchors

# ResNet-FPN / C4 networks small enough to compile in seconds.
TINY = dict(num_classes=4, stage_sizes=(1, 1, 1, 1), width=8, fpn_channels=16,
            representation_size=32, mask_channels=16)
IMAGES = (2, 64, 96, 3)
BOXES = np.array([[4., 6., 40., 30.], [0., 0., 96., 64.], [-150., -100., 200., 200.],
                  [50., 10., 52.5, 12.]], np.float32)
BOX_IMAGES = np.array([0, 1, 1, 0], np.int32)


def random_variables(model, *args, seed=0, **kwargs):
  """Variables with random values of the model's shapes (no init compile).

  BN variances in [0.5, 1.5], kernels scaled by 1/sqrt(fan-in).
  """
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if "var" in name or "scale" in name:
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    if "kernel" in name:
      fan_in = int(np.prod(s.shape[:-1]))
      return (rng.normal(size=s.shape) / np.sqrt(fan_in)).astype(np.float32)
    return (0.1 * rng.normal(size=s.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module", params=["fpn", "c4"])
def tiny(request):
  """(model, variables, jitted outputs on BOXES) of a tiny network."""
  model = MaskRCNNNetworks(layout=request.param, **TINY)
  images = jnp.asarray(np.random.default_rng(1).normal(size=IMAGES), jnp.float32)
  variables = random_variables(model, images)
  out = jax.jit(model.apply)(variables, images, BOXES, BOX_IMAGES)
  return model, variables, images, out


# --- shapes -------------------------------------------------------------------


def test_output_shapes(tiny):
  model, _, _, out = tiny
  spec = LAYOUTS[model.layout]
  r, k = len(BOXES), TINY["num_classes"]
  a = len(spec.anchor_sizes[0]) * len(spec.aspect_ratios[0])
  assert list(out["features"]) == list(
      ("p2", "p3", "p4", "p5", "p6") if model.layout == "fpn" else ("c4",))
  for name, obj, deltas, anchors in zip(spec.rpn_features, out["objectness"],
                                        out["rpn_deltas"], out["anchors"]):
    h, w = out["features"][name].shape[1:3]
    assert obj.shape == (2, h * w * a) and obj.dtype == jnp.float32
    assert deltas.shape == (2, h * w * a, 4) and anchors.shape == (h * w * a, 4)
  m = 28 if model.layout == "fpn" else 14
  assert out["class_logits"].shape == (r, k)
  assert out["box_deltas"].shape == (r, k, 4)
  assert out["mask_logits"].shape == (r, m, m, k)
  for key in ("class_logits", "box_deltas", "mask_logits"):
    assert np.all(np.isfinite(out[key])), key


def test_fpn_sizes_round_up_like_pytorch():
  model = MaskRCNNNetworks(**TINY)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 100, 75, 3)), method=model.features))
  feats = jax.eval_shape(lambda v: model.apply(
      v, jnp.zeros((1, 100, 75, 3)), method=model.features), shapes)
  sizes = {k: v.shape[1:3] for k, v in feats.items()}
  assert sizes == {"p2": (25, 19), "p3": (13, 10), "p4": (7, 5), "p5": (4, 3),
                   "p6": (2, 2)}


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  model = MaskRCNNNetworks(dtype=jnp.bfloat16, **TINY)
  images = jnp.zeros((1, 64, 64, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
  dtypes = {x.dtype for x in jax.tree_util.tree_leaves(variables)}
  assert dtypes == {jnp.dtype("float32")}
  out = jax.eval_shape(lambda v: model.apply(v, images), variables)
  assert out["features"]["p2"].dtype == jnp.bfloat16
  for key in ("class_logits", "box_deltas", "mask_logits"):
    assert out[key].dtype == jnp.float32, key
  assert all(o.dtype == jnp.float32 for o in out["objectness"])


def test_bad_options_raise_config_errors():
  with pytest.raises(ConfigError, match="unknown layout"):
    MaskRCNNNetworks(layout="c5")
  with pytest.raises(ConfigError, match="background"):
    MaskRCNNNetworks(num_classes=1)


# --- numbers against torchvision's definitions ---------------------------------


def test_rpn_outputs_line_up_with_anchors():
  """Entry i of the flattened outputs belongs to anchor i of anchor_grid.

  Hand-set weights make the deltas of anchor a at (y, x) read (x, y, a, 0)
  and its objectness a; the anchor there must be centred at
  (x * stride_x, y * stride_y) with cell anchor a's shape.
  """
  a, (h, w), stride = 3, (5, 7), (16, 12)
  sizes, ratios = (32.0,), (0.5, 1.0, 2.0)
  ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  feature = jnp.asarray(np.stack([ys, xs], -1)[None], jnp.float32)
  conv = np.zeros((3, 3, 2, 2), np.float32)
  conv[1, 1] = np.eye(2)
  box = np.zeros((1, 1, 2, 4 * a), np.float32)
  box[0, 0, 1, 0::4] = 1.0   # delta 0 <- x
  box[0, 0, 0, 1::4] = 1.0   # delta 1 <- y
  params = {"conv": {"kernel": conv, "bias": np.zeros(2, np.float32)},
            "cls_logits": {"kernel": np.zeros((1, 1, 2, a), np.float32),
                           "bias": np.arange(a, dtype=np.float32)},
            "bbox_pred": {"kernel": box,
                          "bias": np.tile([0, 0, 1, 0], a).astype(np.float32)
                          * np.repeat(np.arange(a), 4)}}
  (obj,), (deltas,) = heads.RPNHead(a).apply({"params": params}, [feature])
  anchors = np.asarray(anchor_grid((h, w), stride, sizes, ratios))
  deltas, obj = np.asarray(deltas[0]), np.asarray(obj[0])
  np.testing.assert_array_equal(deltas[:, 2], obj)
  centre = (anchors[:, :2] + anchors[:, 2:]) / 2
  np.testing.assert_array_equal(centre, deltas[:, :2] * np.array(stride[::-1]))
  np.testing.assert_array_equal(anchors - np.concatenate([centre, centre], 1),
                                cell_anchors(sizes, ratios)[obj.astype(int)])


def test_network_anchors_follow_torchvision_strides():
  # AnchorGenerator's stride is image size // feature size per axis: P6 of
  # a 96-wide image has 2 columns -> stride 48, not 64.
  model = MaskRCNNNetworks(**TINY)
  feats = {k: jnp.zeros((1, 64 // s, -(-96 // s), 1))
           for k, s in zip(("p2", "p3", "p4", "p5", "p6"), (4, 8, 16, 32, 64))}
  p6 = np.asarray(model.anchors(feats, (64, 96))[-1])
  centres = (p6[:, :2] + p6[:, 2:]) / 2
  np.testing.assert_array_equal(np.unique(centres[:, 0]), [0.0, 48.0])
  np.testing.assert_array_equal(np.unique(centres[:, 1]), [0.0])


def test_box_head_reads_torchvision_fc6_flattening():
  """fc6 with a converted [O, C*P*P] weight == torch's NCHW flatten + Linear."""
  r, p, c, o, k = 3, 7, 5, 6, 3
  rng = np.random.default_rng(0)
  x = rng.normal(size=(r, p, p, c)).astype(np.float32)
  w6 = rng.normal(size=(o, c * p * p)).astype(np.float32)
  w7, wc, wb = (rng.normal(size=s).astype(np.float32)
                for s in ((o, o), (k, o), (4 * k, o)))
  b = [rng.normal(size=n).astype(np.float32) for n in (o, o, k, 4 * k)]
  kernel6 = convert.KINDS["fc_as_conv7"][0][3](w6)
  params = {"fc6": {"kernel": kernel6, "bias": b[0]},
            "fc7": {"kernel": w7.T, "bias": b[1]},
            "predictor": {"cls_score": {"kernel": wc.T, "bias": b[2]},
                          "bbox_pred": {"kernel": wb.T, "bias": b[3]}}}
  logits, deltas = heads.BoxHead(k, o).apply({"params": params}, x)
  flat = x.transpose(0, 3, 1, 2).reshape(r, -1)               # torch's x.flatten(1)
  hid = np.maximum(np.maximum(flat @ w6.T + b[0], 0) @ w7.T + b[1], 0)
  np.testing.assert_allclose(logits, hid @ wc.T + b[2], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(deltas, (hid @ wb.T + b[3]).reshape(r, k, 4),
                             rtol=1e-5, atol=1e-5)


def _torch_conv_transpose(x, weight, bias):
  """PyTorch ConvTranspose2d(kernel 2, stride 2) by its definition (NHWC)."""
  n, h, w, _ = x.shape
  y = np.zeros((n, 2 * h, 2 * w, weight.shape[1]), np.float64)
  for a in range(2):
    for b in range(2):
      y[:, a::2, b::2] = np.einsum("nijc,co->nijo", x, weight[:, :, a, b])
  return y + bias


@pytest.mark.parametrize("impl", ["fast", "xla"])
def test_conv_transpose_matches_pytorch_definition(impl):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 5, 4)).astype(np.float32)
  weight = rng.normal(size=(4, 6, 2, 2)).astype(np.float32)    # [C_in, C_out, 2, 2]
  bias = rng.normal(size=6).astype(np.float32)
  kernel = convert.KINDS["conv"][0][3](weight)                  # the converter's layout
  module = heads.ConvTranspose2x2(6, impl=impl)
  y = jax.jit(module.apply)({"params": {"kernel": kernel, "bias": bias}}, x)
  np.testing.assert_allclose(y, _torch_conv_transpose(x, weight, bias), rtol=1e-5,
                             atol=1e-5)


def test_fpn_top_down_is_nearest_to_the_lateral_size():
  """The coarser map is resized to the lateral's size (3 -> 5 rows: 0 0 1 1 2)."""
  fpn = FeaturePyramidNetwork(out_channels=2)
  rng = np.random.default_rng(0)
  feats = [jnp.asarray(rng.normal(size=(1, 5, 6, 2)), jnp.float32),
           jnp.asarray(rng.normal(size=(1, 3, 3, 2)), jnp.float32)]
  one = np.eye(2, dtype=np.float32)[None, None]             # 1x1 identity conv
  three = np.pad(one, ((1, 1), (1, 1), (0, 0), (0, 0)))     # 3x3, centre tap only
  zeros = np.zeros(2, np.float32)
  params = {}
  for i in range(2):
    params[f"inner_blocks_{i}"] = {"kernel": one, "bias": zeros}
    params[f"layer_blocks_{i}"] = {"kernel": three, "bias": zeros}
  p3, p4, p5 = fpn.apply({"params": params}, feats)
  coarse = np.asarray(feats[1])[:, [0, 0, 1, 1, 2]][:, :, [0, 0, 1, 1, 2, 2]]
  np.testing.assert_allclose(p3, np.asarray(feats[0]) + coarse, rtol=1e-6)
  np.testing.assert_allclose(p4, feats[1], rtol=1e-6)
  np.testing.assert_array_equal(p5, np.asarray(p4)[:, ::2, ::2])


# --- the whole network ------------------------------------------------------------


def test_methods_compose_to_the_call(tiny):
  model, variables, images, out = tiny
  spec = LAYOUTS[model.layout]

  def piecewise(variables, images):
    apply = lambda method, *a: model.apply(variables, *a, method=method)
    feats = apply(model.features, images)
    pooled = apply(model.pool, feats, BOXES, BOX_IMAGES, spec.box_pool)
    masks = apply(model.mask_outputs,
                  apply(model.pool, feats, BOXES, BOX_IMAGES, spec.mask_pool))
    return apply(model.box_outputs, pooled) + (masks,)

  logits, deltas, masks = jax.jit(piecewise)(variables, images)
  np.testing.assert_allclose(logits, out["class_logits"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(deltas, out["box_deltas"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(masks, out["mask_logits"], rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_param_and_the_image(tiny):
  model, variables, images, _ = tiny

  def loss(params, images):
    out = model.apply({**variables, "params": params}, images, BOXES, BOX_IMAGES)
    return (jnp.sum(out["class_logits"] ** 2) + jnp.sum(out["box_deltas"] ** 2)
            + jnp.mean(out["mask_logits"] ** 2)
            + sum(jnp.mean(o ** 2) for o in out["objectness"])
            + sum(jnp.mean(d ** 2) for d in out["rpn_deltas"]))

  grads, image_grad = jax.jit(jax.grad(loss, argnums=(0, 1)))(
      variables["params"], images)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)) and np.any(g != 0), jax.tree_util.keystr(path)
  assert np.all(np.isfinite(image_grad)) and np.any(image_grad != 0)


def test_head_gradients_numerically():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 3, 3, 4)), jnp.float32)
  for module in (heads.ConvTranspose2x2(3), heads.MaskPredictor(3, dim_reduced=4)):
    v = random_variables(module, x)
    check_grads(lambda y: module.apply(v, y), (x,), order=1, modes=("rev",),
                atol=1e-2, rtol=1e-2)
  boxes = heads.BoxPredictor(3)
  flat = x.reshape(2, -1)
  v = random_variables(boxes, flat)
  check_grads(lambda y: boxes.apply(v, y), (flat,), order=1, modes=("rev",),
              atol=1e-2, rtol=1e-2)


# --- conversion (torch-free) ---------------------------------------------------


def _torch_state(variables, rows):
  """A torch-layout state dict from segjax variables (inverse of the kinds)."""
  state = {}
  for module, path, kind in rows:
    for collection, leaf, suffix, _, _ in convert.KINDS[kind]:
      value = convert.tree_lookup(variables, (collection,) + path + (leaf,))
      if value is None:
        continue
      value = np.asarray(value)
      if kind == "conv" and leaf == "kernel":
        value = value.transpose(3, 2, 0, 1)
      elif kind == "linear" and leaf == "kernel":
        value = value.T
      elif kind.startswith("fc_as_conv") and leaf == "kernel":
        value = value.transpose(3, 2, 0, 1).reshape(value.shape[3], -1)
      state[f"{module}.{suffix}"] = value
  return state


@pytest.fixture(scope="module")
def tiny_state():
  model = MaskRCNNNetworks(**TINY)
  variables = random_variables(model, jnp.zeros((1, 32, 32, 3)))
  rows = convert.CONVERTERS["maskrcnn_resnet50_fpn"]({}, **TINY).rows
  return variables, _torch_state(variables, rows)


def test_converter_accepts_legacy_key_names(tiny_state):
  variables, state = tiny_state
  legacy = {}
  for key, value in state.items():
    key = key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
    for i in range(4):
      key = key.replace(f"fpn.inner_blocks.{i}.0.", f"fpn.inner_blocks.{i}.")
      key = key.replace(f"fpn.layer_blocks.{i}.0.", f"fpn.layer_blocks.{i}.")
      key = key.replace(f"mask_head.{i}.0.", f"mask_head.mask_fcn{i + 1}.")
    legacy[key] = value
  assert len(set(legacy) - set(state)) == 2 + 16 + 8
  kwargs = {k: v for k, v in TINY.items() if k != "num_classes"}
  got = convert.from_torch("maskrcnn_resnet50_fpn", legacy, **kwargs)
  # Structure and values (chex names the leaf): a lost leaf fails too.
  chex.assert_trees_all_equal(got, variables)


def test_converter_folds_checkpoint_bn_eps_into_variances(tiny_state):
  variables, state = tiny_state
  kwargs = {k: v for k, v in TINY.items() if k != "num_classes"}
  got = convert.from_torch("maskrcnn_resnet50_fpn", state, frozen_bn_eps=0.0, **kwargs)
  want = np.asarray(variables["batch_stats"]["backbone"]["body"]["bn1"]["var"])
  np.testing.assert_allclose(got["batch_stats"]["backbone"]["body"]["bn1"]["var"],
                             want - 1e-5, rtol=1e-6)


def test_converter_is_strict_and_says_how_to_fix(tiny_state):
  _, state = tiny_state
  kwargs = {k: v for k, v in TINY.items() if k != "num_classes"}
  with pytest.raises(CheckpointError, match="pass num_classes=4"):
    convert.from_torch("maskrcnn_resnet50_fpn", state, num_classes=6, **kwargs)
  broken = dict(state)
  del broken["roi_heads.mask_predictor.conv5_mask.bias"]
  broken["roi_heads.mask_head.4.0.weight"] = np.zeros((16, 16, 3, 3), np.float32)
  with pytest.raises(CheckpointError) as err:
    convert.from_torch("maskrcnn_resnet50_fpn", broken, **kwargs)
  assert "missing keys (1): roi_heads.mask_predictor.conv5_mask.bias" in str(err.value)
  assert "unexpected keys (1): roi_heads.mask_head.4.0.weight" in str(err.value)


def test_faster_converter_is_the_mask_one_less_the_mask_branch(tiny_state):
  """fasterrcnn_resnet50_fpn: the same rows less roi_heads.mask_*, into
  MaskRCNNNetworks(masks=False); a Mask R-CNN state is refused, saying so."""
  variables, state = tiny_state
  kwargs = {k: v for k, v in TINY.items() if k != "num_classes"}
  faster = {k: v for k, v in state.items() if not k.startswith("roi_heads.mask_")}
  assert len(state) - len(faster) == 12
  got = convert.from_torch("fasterrcnn_resnet50_fpn", faster, **kwargs)
  want = {**variables, "params": {k: v for k, v in variables["params"].items()
                                  if k != "mask_head"}}
  chex.assert_trees_all_equal(got, want)
  with pytest.raises(CheckpointError, match="convert it as maskrcnn_resnet50_fpn"):
    convert.from_torch("fasterrcnn_resnet50_fpn", state, **kwargs)
