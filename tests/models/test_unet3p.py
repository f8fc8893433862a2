"""UNet 3+ specifics: full-scale skips, deep supervision, CGM, learning.

The generic contract (shapes, gradients, batch_stats) is in test_contract.py.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from segjax import losses
from segjax import models
from segjax.errors import ConfigError

from learning import squares_batch  # pylint: disable=import-error


def make_key(seed):
  # rbg compiles much faster than threefry on XLA:CPU; the stream is irrelevant.
  return jax.random.key(seed, impl="rbg")


def init(model, shape):
  return jax.jit(lambda x: model.init(make_key(0), x))(jnp.zeros(shape))


def param_shapes(model, shape):
  """{"/"-joined path: shape} of the params, from shapes only (nothing runs)."""
  variables = jax.eval_shape(lambda: model.init(make_key(0), jnp.zeros(shape)))
  return {k: v.shape for k, v in traverse_util.flatten_dict(
      variables["params"], sep="/").items()}


def random_images(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_full_scale_skips_paper_sizes():
  """The paper's model: 64..1024 encoder, CatChannels 64, UpChannels 320."""
  model = models.build("unet3p", 2)
  shapes = param_shapes(model, (1, 16, 16, 3))
  enc = [64, 128, 256, 512, 1024]
  assert [shapes[f"enc{i}/conv1/conv/kernel"][-1] for i in range(5)] == enc
  for i in range(4):  # decoder levels X_De^0..3 (the paper's 1..4)
    # Encoder features of the same and finer scales, max-pooled...
    for k in range(i + 1):
      assert shapes[f"dec{i}_from_enc{k}/conv/kernel"] == (3, 3, enc[k], 64)
    # ...and coarser decoder features (X_De^4 = X_En^4), upsampled.
    for k in range(i + 1, 5):
      c_in = 1024 if k == 4 else 320
      assert shapes[f"dec{i}_from_dec{k}/conv/kernel"] == (3, 3, c_in, 64)
    assert not any(p.startswith(f"dec{i}_from_enc{i + 1}") for p in shapes)
    # Five 64-channel maps concatenated: 320 in, 320 out.
    assert shapes[f"dec{i}_fuse/conv/kernel"] == (3, 3, 320, 320)
  # Full-scale deep supervision: a 3x3 head on each of the 5 levels.
  heads = sorted(p for p in shapes if p.startswith("head"))
  assert heads == [f"head{i}/{w}" for i in range(5) for w in ("bias", "kernel")]
  assert shapes["head0/kernel"] == (3, 3, 320, 2)
  assert shapes["head4/kernel"] == (3, 3, 1024, 2)
  assert not any(p.startswith("cgm") for p in shapes)


@pytest.mark.parametrize("depth,cat", [(2, None), (3, 5)])
def test_concatenation_is_levels_times_cat_channels(depth, cat):
  model = models.build("unet3p", 2, depth=depth, base_width=4,
                       cat_channels=cat)
  shapes = param_shapes(model, (1, 16, 16, 3))
  cat = cat or 4
  for i in range(depth):
    parts = [p for p in shapes if p.startswith(f"dec{i}_from_")
             and p.endswith("/conv/kernel")]
    assert len(parts) == depth + 1
    assert all(shapes[p][-1] == cat for p in parts)
    assert shapes[f"dec{i}_fuse/conv/kernel"] == (
        3, 3, (depth + 1) * cat, (depth + 1) * cat)


def test_rejects_bad_options():
  for bad in [dict(norm="layer"), dict(depth=0), dict(cat_channels=0),
              dict(cgm_dropout=1.0)]:
    with pytest.raises(ConfigError):
      models.build("unet3p", 2, **bad)


# One small model with every part (deep supervision and CGM), initialised
# once for the tests below; the model without CGM uses the same params.
DEPTH = 3
SMALL = dict(depth=DEPTH, base_width=4)


@pytest.fixture(scope="module")
def small_model():
  model = models.build("unet3p", 3, cgm=True, **SMALL)
  return model, init(model, (1, 16, 16, 3))


def without_cgm(variables):
  return {"params": {k: v for k, v in variables["params"].items()
                     if k != "cgm"},
          "batch_stats": variables["batch_stats"]}


# Both tests below run the model without CGM on these images: one compile.
IMAGES = random_images((2, 20, 27, 3))  # padded to 24 x 32 inside


@functools.lru_cache
def jit_apply(model):
  return jax.jit(model.apply)


def test_deep_supervision_heads(small_model):
  _, variables = small_model
  model = models.build("unet3p", 3, **SMALL)
  out = jit_apply(model)(without_cgm(variables), IMAGES)
  assert set(out) == {"logits", "aux"}
  assert len(out["aux"]) == DEPTH  # + "logits": one head per level
  for logits in [out["logits"], *out["aux"]]:
    assert logits.shape == (2, 20, 27, 3) and logits.dtype == jnp.float32
  # The coarse heads are bilinear upsamplings of 1/2**i maps: smoother than
  # the finest head (mean absolute difference of neighbouring pixels).
  roughness = [float(np.mean(np.abs(np.diff(a, axis=1))))
               for a in [out["logits"], *out["aux"]]]
  assert roughness[-1] < roughness[0], roughness
  # Without deep supervision: only the finest head (and the same params
  # otherwise), so the same prediction.
  single = models.build("unet3p", 3, deep_supervision=False, **SMALL)
  shapes = param_shapes(single, IMAGES.shape)
  full = param_shapes(model, IMAGES.shape)
  assert shapes == {p: s for p, s in full.items()
                    if not p.startswith("head") or p.startswith("head0/")}


def test_cgm_gates_masks_per_image(small_model):
  model, variables = small_model
  params = variables["params"]
  channels = 4 * 2**DEPTH
  assert params["cgm"]["kernel"].shape == (1, 1, channels, 2)
  want = jit_apply(models.build("unet3p", 3, **SMALL))(without_cgm(variables),
                                                       IMAGES)
  # Also returns the bottom encoder features, which the CGM reads.
  apply = jax.jit(lambda v: model.apply(
      v, IMAGES, mutable=["intermediates"],
      capture_intermediates=lambda m, _: m.name == f"enc{DEPTH}"))

  def with_cgm(kernel, bias):
    new = dict(params, cgm={"kernel": jnp.asarray(kernel, jnp.float32),
                            "bias": jnp.asarray(bias, jnp.float32)})
    out, state = apply({**variables, "params": new})
    return out, np.asarray(state["intermediates"][f"enc{DEPTH}"]["__call__"][0])

  zeros = np.zeros((1, 1, channels, 2), np.float32)
  # The classifier says "no object" (class 0) for every image: all masks 0.
  out, bottom = with_cgm(zeros, [1.0, 0.0])
  assert out["cls"].shape == (2, 2) and out["cls"].dtype == jnp.float32
  np.testing.assert_allclose(out["cls"], [[1.0, 0.0], [1.0, 0.0]])
  assert len(out["aux"]) == DEPTH
  for logits in [out["logits"], *out["aux"]]:
    assert logits.shape == (2, 20, 27, 3)
    assert np.all(logits == 0)
  # "Object" for every image: the masks pass unchanged.
  out, _ = with_cgm(zeros, [0.0, 1.0])
  for got, ref in zip([out["logits"], *out["aux"]],
                      [want["logits"], *want["aux"]]):
    np.testing.assert_allclose(got, ref, atol=1e-6)

  # Per image: the object logit is the global max of one bottom channel,
  # thresholded between the two images' maxima: only one image passes.
  assert bottom.shape == (2, 3, 4, channels)
  peaks = bottom.max(axis=(1, 2))  # [2, C]
  channel = int(np.argmax(np.abs(peaks[0] - peaks[1])))
  hi, lo = sorted(peaks[:, channel], reverse=True)
  assert hi > lo
  kernel = zeros.copy()
  kernel[0, 0, channel, 1] = 1.0
  out, _ = with_cgm(kernel, [(hi + lo) / 2, 0.0])
  np.testing.assert_allclose(out["cls"][:, 1], peaks[:, channel], rtol=1e-5)
  on = int(np.argmax(peaks[:, channel]))
  for got, ref in zip([out["logits"], *out["aux"]],
                      [want["logits"], *want["aux"]]):
    np.testing.assert_allclose(got[on], ref[on], atol=1e-6)
    assert np.all(got[1 - on] == 0)


# ----------------------------------------------------------------------------
# It learns.


def test_unet3p_learns_squares_with_deep_supervision_and_cgm(small_model):
  images, labels = squares_batch()
  model, variables = small_model
  tx = optax.adam(1e-2)
  # Both images hold objects: the CGM's target is (no object, object) = (0, 1).
  has_object = jnp.array([[0.0, 1.0]] * 2)

  def loss_fn(params, batch_stats, rng):
    outputs, state = model.apply(
        {"params": params, "batch_stats": batch_stats}, images, train=True,
        mutable=["batch_stats"], rngs={"dropout": rng})
    # Full-scale deep supervision: every level's head gets its own loss,
    # plus the CGM's BCE (on sigmoid outputs, as in the paper).
    heads = [outputs["logits"], *outputs["aux"]]
    seg = sum(losses.cross_entropy(h, labels) for h in heads) / len(heads)
    cls = jnp.mean(optax.sigmoid_binary_cross_entropy(outputs["cls"],
                                                      has_object))
    return seg + cls, (state["batch_stats"], seg, cls, outputs["cls"])

  @jax.jit
  def step(params, batch_stats, opt_state, i):
    rng = jax.random.fold_in(make_key(1), i)
    (_, (batch_stats, *losses_and_cls)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params, batch_stats, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), batch_stats, opt_state,
            *losses_and_cls)

  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)
  seg_history, cls_history = [], []
  for i in range(40):
    params, batch_stats, opt_state, seg, cls, cls_logits = step(
        params, batch_stats, opt_state, i)
    seg_history.append(float(seg))
    cls_history.append(float(cls))
  # The segmentation loss falls by 90 %. The CGM's BCE falls more slowly and
  # noisily (a global max under dropout 0.5), but its decision is right.
  assert seg_history[-1] <= 0.1 * seg_history[0], seg_history[::5]
  assert cls_history[-1] <= 0.5 * cls_history[0], cls_history[::5]
  assert np.all(np.argmax(cls_logits, axis=-1) == 1), cls_logits
  # Every head and the classifier were trained.
  for name in [f"head{i}" for i in range(DEPTH + 1)] + ["cgm"]:
    assert not np.allclose(params[name]["kernel"],
                           variables["params"][name]["kernel"]), name
