"""SETR and its ViT encoder: learning, layer choice, sizes, position
embeddings, auxiliary heads and inputs that are not multiples of 16.

The position-embedding resize is checked against loops written from
PyTorch's documented `F.interpolate` semantics (align_corners=False, plain and
antialiased bicubic); tests/test_convert_timm.py checks it against torch and
timm themselves where they are installed.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import models
from segjax.models import setr
from segjax.models.backbones import vit as vit_lib

from learning import train_losses  # pylint: disable=import-error

NUM_CLASSES = 3
TINY = dict(width=32, num_heads=2, pretrain_grid=(4, 4), channels=16,
            mla_head_channels=8)


def _count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def _shapes(model, size=(64, 64)):
  """Variables and outputs of `model` as shapes: traced, nothing computed."""
  images = jnp.zeros((2, *size, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
  outputs = jax.eval_shape(lambda v: model.apply(v, images), variables)
  return variables, outputs


# --- learning ---------------------------------------------------------------


def patch_aligned_squares(size=64, seed=0):
  """Two noisy images with a class-1 and a class-2 square (bright in channel
  0 / 1) whose sides (16 or 32) and corners lie on the 16-pixel patch grid.

  SETR-Naive's logits are a bilinear upsampling of one value per patch, so
  labels constant on patches are what every decoder can fit almost exactly.
  """
  rng = np.random.default_rng(seed)
  images = rng.normal(scale=0.3, size=(2, size, size, 3)).astype(np.float32)
  labels = np.zeros((2, size, size), np.int32)
  for i in range(2):
    for cls in (1, 2):
      y, x = 16 * rng.integers(0, size // 16 - 1, size=2)
      side = 16 * rng.integers(1, 3)
      labels[i, y:y + side, x:x + side] = cls
      images[i, y:y + side, x:x + side, cls - 1] += 1.0
  return images, labels


# decoder -> (ViT depth, Adam steps). Naive needs more steps: its logits only
# sharpen at patch borders as their magnitude grows.
LEARNING = {"setr_naive": (2, 80), "setr_pup": (2, 60), "setr_mla": (4, 60)}


@pytest.mark.parametrize("name", sorted(LEARNING))
def test_learns_patch_aligned_squares(name):
  depth, steps = LEARNING[name]
  images, labels = patch_aligned_squares()
  model = models.build(name, NUM_CLASSES, depth=depth, **TINY)
  history = train_losses(model, images, labels, steps, 1e-2)
  # The mean of the last steps: Adam's steps make single losses jumpy.
  assert np.mean(history[-5:]) <= 0.1 * history[0], (name, history[::10])


# --- which layers feed the decoders -------------------------------------------


def test_mla_reads_evenly_spaced_layers():
  assert setr.mla_layers(24) == (5, 11, 17, 23)  # the paper's 6/12/18/24
  assert setr.mla_layers(12) == (2, 5, 8, 11)
  assert setr.mla_layers(4) == (0, 1, 2, 3)
  assert models.build("setr_mla", 5).encoder_layers() == (5, 11, 17, 23)
  assert models.build("setr_mla", 5, size="base").encoder_layers() == (2, 5, 8, 11)


def test_naive_and_pup_read_the_last_layer_and_mmseg_aux_layers():
  assert setr.aux_layers(24) == (9, 14, 19)  # mmseg's out_indices
  for name in ("setr_naive", "setr_pup"):
    assert models.build(name, 5).encoder_layers() == (23,)
    assert models.build(name, 5, aux=True).encoder_layers() == (9, 14, 19, 23)
    assert models.build(name, 5, aux=True, aux_layers=(3,),
                        size="base").encoder_layers() == (3, 11)


def test_vit_returns_the_requested_blocks():
  """Changing a block after the last requested one changes nothing;
  changing a requested one changes its output and the later ones'."""
  vit = vit_lib.ViT(width=8, depth=3, num_heads=1, pretrain_grid=(2, 2),
                    out_indices=(0, -2))
  images = jnp.asarray(patch_aligned_squares(size=32)[0][:1])
  variables = jax.jit(lambda x: vit.init(jax.random.key(0), x))(images)
  assert vit.indices() == (0, 1)
  apply = jax.jit(lambda v: vit.apply(v, images))
  base = apply(variables)
  assert [f.shape for f in base] == [(1, 2, 2, 8)] * 2

  def bumped(block):
    params = jax.tree_util.tree_map(lambda x: x, variables["params"])
    bias = params[block]["mlp"]["fc2"]["bias"]
    params[block]["mlp"]["fc2"]["bias"] = bias + 1.0
    return apply({"params": params})

  after_last = bumped("blocks_2")
  assert len(after_last) == len(base)
  for got, want in zip(after_last, base):
    np.testing.assert_array_equal(got, want)
  first, second = bumped("blocks_1")
  np.testing.assert_array_equal(first, base[0])
  assert not np.allclose(second, base[1])


# --- sizes ------------------------------------------------------------------


def vit_param_count(width, depth, grid=24, class_token=True, final_norm=True):
  """Parameters of timm's ViT-*/16 without its classifier, by hand."""
  patch = 16 * 16 * 3 * width + width
  tokens = grid * grid + int(class_token)
  block = (4 * width                          # two LayerNorms
           + width * 3 * width + 3 * width    # qkv
           + width * width + width            # proj
           + width * 4 * width + 4 * width    # fc1
           + 4 * width * width + width)       # fc2
  return (patch + tokens * width + width * int(class_token) + depth * block
          + 2 * width * int(final_norm))


@pytest.mark.parametrize("size,millions", [("base", 86.1), ("large", 303.7)])
def test_vit_parameter_counts(size, millions):
  shape = vit_lib.SIZES[size]
  vit = vit_lib.ViT(**shape, final_norm=True)
  variables = jax.eval_shape(lambda: vit.init(jax.random.key(0),
                                              jnp.zeros((1, 384, 384, 3))))
  count = _count(variables)
  assert count == vit_param_count(shape["width"], shape["depth"])
  # timm's vit_*_patch16_384 (86.86M / 304.72M) minus the 1000-way head.
  assert abs(count / 1e6 - millions) < 0.05, count


def test_setr_pup_large_parameters():
  variables, _ = _shapes(models.build("setr_pup", 150), (64, 64))
  params = variables["params"]
  # SETR's ViT-L has no final norm (mmseg's final_norm=False).
  assert _count(params["backbone"]) == vit_param_count(1024, 24, final_norm=False)
  # LN, 3x3 conv 1024 -> 256 + BN, three 3x3 256 -> 256 + BN, 1x1 to 150.
  head = (2 * 1024 + 9 * 1024 * 256 + 2 * 256 + 3 * (9 * 256 * 256 + 2 * 256)
          + 256 * 150 + 150)
  assert _count(params["decode_head"]) == head
  assert set(params) == {"backbone", "decode_head"}


# --- position embeddings ----------------------------------------------------


def _cubic(x, a):
  x = abs(x)
  if x <= 1:
    return ((a + 2) * x - (a + 3)) * x * x + 1
  if x < 2:
    return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
  return 0.0


def bicubic_loop(grid, out_h, out_w):
  """PyTorch's bicubic, align_corners=False, one output pixel at a time:
  source s = (i + 0.5) * in / out - 0.5, the 4 x 4 taps around floor(s)
  with clamped indices, Keys' kernel a = -0.75."""
  in_h, in_w, c = grid.shape
  out = np.zeros((out_h, out_w, c))
  for i in range(out_h):
    sy = (i + 0.5) * in_h / out_h - 0.5
    for j in range(out_w):
      sx = (j + 0.5) * in_w / out_w - 0.5
      for ty in range(int(np.floor(sy)) - 1, int(np.floor(sy)) + 3):
        for tx in range(int(np.floor(sx)) - 1, int(np.floor(sx)) + 3):
          w = _cubic(sy - ty, -0.75) * _cubic(sx - tx, -0.75)
          out[i, j] += w * grid[min(max(ty, 0), in_h - 1),
                                min(max(tx, 0), in_w - 1)]
  return out


def _aa_weights(in_size, out_size, i):
  """PIL / PyTorch antialias bicubic weights of output i: {tap: weight}."""
  scale = in_size / out_size
  support = 2 * max(scale, 1.0)
  centre = (i + 0.5) * scale
  taps = [t for t in range(in_size) if abs(t + 0.5 - centre) < support]
  w = {t: _cubic((t + 0.5 - centre) / max(scale, 1.0), -0.5) for t in taps}
  total = sum(w.values())
  return {t: v / total for t, v in w.items()}


def antialias_loop(grid, out_h, out_w):
  """PyTorch's bicubic with antialias=True: separable, per-axis weights
  normalised over the taps inside the input."""
  in_h, in_w, c = grid.shape
  out = np.zeros((out_h, out_w, c))
  for i in range(out_h):
    wy = _aa_weights(in_h, out_h, i)
    for j in range(out_w):
      wx = _aa_weights(in_w, out_w, j)
      for ty, a in wy.items():
        for tx, b in wx.items():
          out[i, j] += a * b * grid[ty, tx]
  return out


@pytest.mark.parametrize("old,new", [((6, 5), (9, 7)), ((6, 6), (4, 3)),
                                     ((24, 24), (5, 32))])
@pytest.mark.parametrize("antialias", [False, True])
def test_pos_embed_resize_matches_loops(old, new, antialias):
  rng = np.random.default_rng(0)
  grid = rng.normal(size=(*old, 3))
  got = jax.jit(lambda g: vit_lib.resize_pos_embed(
      g, old, new, antialias=antialias))(grid.reshape(-1, 3).astype(np.float32))
  loop = antialias_loop if antialias else bicubic_loop
  np.testing.assert_allclose(np.asarray(got).reshape(*new, 3),
                             loop(grid, *new), atol=1e-5)


def test_pos_embed_resize_is_the_identity_on_the_stored_grid():
  grid = jnp.arange(12.0).reshape(6, 2)
  assert vit_lib.resize_pos_embed(grid, (2, 3), (2, 3)) is grid


def test_class_token_row_is_kept_out_of_the_resize():
  """With the patch conv and every residual branch zeroed, the features are
  the resized grid embeddings alone, whatever the class token's row holds."""
  vit = vit_lib.ViT(width=8, depth=1, num_heads=1, pretrain_grid=(3, 3))
  images = jnp.zeros((1, 64, 80, 3))  # a 4 x 5 grid
  params = jax.jit(lambda x: vit.init(jax.random.key(0), x))(images)["params"]
  zero = lambda tree: jax.tree_util.tree_map(jnp.zeros_like, tree)
  params["patch_embed"] = zero(params["patch_embed"])
  params["blocks_0"]["attn"]["proj"] = zero(params["blocks_0"]["attn"]["proj"])
  params["blocks_0"]["mlp"]["fc2"] = zero(params["blocks_0"]["mlp"]["fc2"])
  params["pos_embed"] = params["pos_embed"].at[0, 0].set(1e3)
  features = jax.jit(lambda p: vit.apply({"params": p}, images))(params)[0]
  want = vit_lib.resize_pos_embed(params["pos_embed"][0, 1:], (3, 3), (4, 5))
  np.testing.assert_allclose(features, np.asarray(want).reshape(1, 4, 5, 8),
                             atol=1e-6)


# --- auxiliary heads, resolution, dtype ----------------------------------------


@pytest.mark.parametrize("name,count", [("setr_naive", 3), ("setr_pup", 3),
                                        ("setr_mla", 4)])
def test_aux_heads_only_when_asked(name, count):
  variables, outputs = _shapes(models.build(name, NUM_CLASSES, aux=True,
                                            depth=4, **TINY), (66, 50))
  assert "auxiliary_head" in variables["params"]
  assert len(outputs["aux"]) == count
  for aux in outputs["aux"]:
    assert aux.shape == (2, 66, 50, NUM_CLASSES) and aux.dtype == jnp.float32
  variables, outputs = _shapes(models.build(name, NUM_CLASSES, depth=4, **TINY))
  assert "aux" not in outputs and "auxiliary_head" not in variables["params"]
  # The heads' 10x learning rate names these top-level modules.
  expected = {"backbone", "decode_head"} | ({"neck"} if name == "setr_mla" else set())
  assert set(variables["params"]) == expected


def test_logits_of_any_size_are_the_padded_images_cropped():
  """A 50 x 70 input gives the logits of its zero-padded 64 x 80 canvas,
  cropped: every logit stays on its pixel."""
  model = models.build("setr_naive", NUM_CLASSES, depth=1, **TINY)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(1, 50, 70, 3)).astype(np.float32)
  padded = np.pad(images, ((0, 0), (0, 14), (0, 10), (0, 0)))
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x))(padded)
  apply = lambda x: model.apply(variables, x)["logits"]
  small, large = jax.jit(apply)(images), jax.jit(apply)(padded)
  assert small.shape == (1, 50, 70, NUM_CLASSES)
  np.testing.assert_allclose(small, large[:, :50, :70], rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = models.build("setr_mla", NUM_CLASSES, depth=4, dtype="bfloat16", **TINY)
  variables, outputs = _shapes(model)
  assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(variables))
  assert outputs["logits"].dtype == jnp.float32
