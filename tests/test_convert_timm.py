"""segjax.convert.timm: timm ViT state dicts -> backbones.vit.ViT / SETR.

Strictness, the dropped classification keys, `vit_into` and `segjax convert`
run on numpy state dicts (no torch). The parity tests convert randomly
initialised timm VisionTransformers and compare their intermediate layers
with segjax's at an input size other than the pretraining one, so the
position embeddings are resized on both sides; they skip cleanly where torch
or timm is not installed.
"""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import needs
from segjax import cli, convert, models, weights
from segjax.errors import CheckpointError, ConfigError
from segjax.models.backbones import vit as vit_lib
from segjax.train import checkpoint

from test_convert import _random_state, relative_error  # pylint: disable=import-error

# No figure in the README ("Parity tests" lists the test without one).
# Measured under jax.default_matmul_precision("highest"): intermediate
# layers 4.5e-7..8.1e-7; the position-embedding resize 1.2e-7..1.8e-6.
TIMM_RTOL = 5e-6
SMALL = dict(width=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def small_state():
  """(variables, timm-layout state dict) of a small ViT with a 24 x 24 grid."""
  return _random_state("vit_base_patch16_384", **SMALL)


# --- strictness and options (no torch needed) -----------------------------------


def test_classification_keys_are_dropped(small_state):
  variables, state = small_state
  state = dict(state, **{"head.weight": np.zeros((1000, 32), np.float32),
                         "head.bias": np.zeros((1000,), np.float32),
                         "fc_norm.weight": np.ones(32, np.float32)})
  converted = convert.from_torch("vit_base_patch16_384", state, **SMALL)
  np.testing.assert_array_equal(converted["params"]["pos_embed"],
                                variables["params"]["pos_embed"])
  assert set(converted["params"]) == set(variables["params"])
  assert converted["params"]["pos_embed"].shape == (1, 1 + 24 * 24, 32)


def test_rejects_missing_unexpected_and_misshaped_keys(small_state):
  _, state = small_state
  state = dict(state)
  del state["blocks.1.attn.qkv.bias"]
  state["blocks.0.attn.extra"] = np.zeros(3, np.float32)
  state["cls_token"] = np.zeros((1, 2, 32), np.float32)
  with pytest.raises(CheckpointError) as err:
    convert.from_torch("vit_base_patch16_384", state, **SMALL)
  message = str(err.value)
  assert "missing keys (1): blocks.1.attn.qkv.bias" in message
  assert "unexpected keys (1): blocks.0.attn.extra" in message
  assert re.search(r"cls_token: shape \(1, 2, 32\), expected \(1, 1, 32\)",
                   message)


def test_a_checkpoint_of_another_size_says_which(small_state):
  _, state = small_state
  with pytest.raises(CheckpointError, match="width 32 and depth 2") as err:
    convert.from_torch("vit_base_patch16_384", state, width=32, depth=3,
                       num_heads=2)
  assert "missing keys" in str(err.value)  # blocks.2.*


def test_no_class_token_and_no_final_norm(small_state):
  variables, state = small_state
  converted = convert.from_torch("vit_base_patch16_384", state, **SMALL,
                                 class_token=False, final_norm=False)
  params = converted["params"]
  assert "cls_token" not in params and "norm" not in params
  # The class token's row goes with it; the 24 x 24 grid stays.
  np.testing.assert_array_equal(params["pos_embed"],
                                variables["params"]["pos_embed"][:, 1:])


def _setr(name, **kwargs):
  """Zero variables of a small SETR (SMALL's ViT unless overridden)."""
  model = models.build(name, 3, **{**SMALL, "channels": 8,
                                   "mla_head_channels": 8, **kwargs})
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), shapes)


@pytest.mark.parametrize("name", ["setr_naive", "setr_mla"])
def test_vit_into_fills_the_backbone_only(small_state, name):
  variables, state = small_state
  state = dict(state, **{"head.weight": np.zeros((1000, 32), np.float32)})
  zeros = _setr(name)
  filled = weights.vit_into(name, zeros, state)
  backbone = filled["params"]["backbone"]
  np.testing.assert_array_equal(backbone["blocks_1"]["attn"]["qkv"]["kernel"],
                                variables["params"]["blocks_1"]["attn"]["qkv"]["kernel"])
  # SETR has no final norm; MLA has no class token either.
  assert "norm" not in backbone
  pos = variables["params"]["pos_embed"]
  if name == "setr_mla":
    assert "cls_token" not in backbone
    np.testing.assert_array_equal(backbone["pos_embed"], pos[:, 1:])
  else:
    np.testing.assert_array_equal(backbone["cls_token"],
                                  variables["params"]["cls_token"])
    np.testing.assert_array_equal(backbone["pos_embed"], pos)
  heads = {k: v for k, v in filled["params"].items() if k != "backbone"}
  assert heads and not any(np.any(l) for l in jax.tree_util.tree_leaves(heads))
  assert (jax.tree_util.tree_structure(filled)
          == jax.tree_util.tree_structure(weights._to_dicts(zeros)))


def test_vit_into_says_how_to_fix_mismatches(small_state):
  _, state = small_state
  with pytest.raises(CheckpointError, match="pretrain_grid"):
    weights.vit_into("setr_pup", _setr("setr_pup", pretrain_grid=(4, 4)), state)
  with pytest.raises(CheckpointError, match="width 32 and depth 2"):
    weights.vit_into("setr_pup", _setr("setr_pup", depth=3), state)
  with pytest.raises(ConfigError, match="setr_mla"):
    weights.vit_into("unet", {}, state)


def test_segjax_convert_writes_an_init_checkpoint(small_state, tmp_path, capsys):
  """`segjax convert --config configs/setr_pup_shapes.py`: the backbone of
  the config's (small) model from a timm-layout .npz file."""
  from segjax import config as config_lib
  config = config_lib.load_config("configs/setr_pup_shapes.py")
  shape = {k: config.model_kwargs[k] for k in ("width", "depth", "num_heads")}
  grid = tuple(config.model_kwargs.pretrain_grid)
  variables, state = _random_state("vit_base_patch16_384", **shape,
                                   pretrain_grid=grid)
  path = str(tmp_path / "vit.npz")
  np.savez(path, **state)
  out = str(tmp_path / "init")
  code = cli.main(["convert", "--config", "configs/setr_pup_shapes.py",
                   "--weights", path, "--output", out])
  _, err = capsys.readouterr()
  assert code == 0, err
  restored = checkpoint.restore_on_host(os.path.join(out, "checkpoints", "0"))
  assert set(restored["params"]) == {"backbone"}
  backbone = restored["params"]["backbone"]
  assert "norm" not in backbone  # SETR runs without the final norm
  for key in ("pos_embed", "cls_token"):
    np.testing.assert_array_equal(backbone[key], variables["params"][key])


# --- parity with timm ---------------------------------------------------------


@pytest.fixture(scope="module")
def torch():
  torch = needs("torch")
  needs("timm")
  torch.manual_seed(0)
  torch.set_num_threads(1)
  return torch


def _timm_vit(torch, **kwargs):
  """A random timm ViT (64 x 64 pretraining size, a 4 x 4 grid) whose
  LayerNorms, class token and position embeddings are randomised too."""
  from timm.models.vision_transformer import VisionTransformer
  net = VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=4,
                          num_heads=4, num_classes=10, **kwargs).eval()
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in net.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=generator))
      elif "norm" in name or name in ("cls_token", "pos_embed"):
        p.copy_(0.5 * torch.randn(p.shape, generator=generator))
  return net


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _features(vit, variables, images):
  with jax.default_matmul_precision("highest"):
    return jax.jit(lambda v, x: vit.apply(v, x))(variables, images)


@pytest.mark.parametrize("size", [(64, 64), (96, 80)])
@pytest.mark.parametrize("norm", [False, True])
def test_intermediate_layers_parity(torch, size, norm):
  """timm with dynamic_img_size=True resizes its position embeddings with
  the antialiased bicubic; segjax's ViT with pos_embed_antialias=True."""
  net = _timm_vit(torch, dynamic_img_size=True)
  x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    expected = net.get_intermediate_layers(x, n=[1, 3], reshape=True, norm=norm)
  variables = convert.from_torch("vit_base_patch16_384", net.state_dict(),
                                 width=64, depth=4, num_heads=4)
  vit = vit_lib.ViT(width=64, depth=4, num_heads=4, pretrain_grid=(4, 4),
                    out_indices=(1, 3), final_norm=True,
                    pos_embed_antialias=True, attention_impl="einsum")
  if not norm:  # the same weights without applying the final norm
    vit = vit.clone(final_norm=False)
    variables = {"params": {k: v for k, v in variables["params"].items()
                            if k != "norm"}}
  ours = _features(vit, variables, jnp.asarray(_nhwc(x)))
  for layer, got, want in zip((1, 3), ours, expected):
    err = relative_error(got, _nhwc(want))
    print(f"timm ViT {size} block {layer} norm={norm}: rel err {err:.2e}")
    assert err <= TIMM_RTOL


def test_plain_bicubic_resize_parity(torch):
  """The default (mmseg's) resize equals
  timm's resample_abs_pos_embed with antialias=False, class row kept."""
  from timm.layers import resample_abs_pos_embed
  pos = torch.randn(1, 1 + 24 * 24, 16, generator=torch.Generator().manual_seed(3))
  for new in [(32, 32), (5, 7), (48, 20)]:
    want = resample_abs_pos_embed(pos, new_size=list(new), old_size=[24, 24],
                                  num_prefix_tokens=1, antialias=False)
    grid = vit_lib.resize_pos_embed(jnp.asarray(pos[0, 1:].numpy()), (24, 24), new)
    got = np.concatenate([pos[0, :1].numpy(), np.asarray(grid)])
    err = relative_error(got, want[0].numpy())
    print(f"resample_abs_pos_embed 24x24 -> {new}: rel err {err:.2e}")
    assert err <= TIMM_RTOL


def test_real_vit_b_state_dict_converts(torch):
  """Every key of timm's vit_base_patch16_384 (random weights) maps, at the
  real size; the ImageNet head is dropped."""
  import timm
  net = timm.create_model("vit_base_patch16_384", pretrained=False)
  state = net.state_dict()
  converted = convert.from_torch("vit_base_patch16_384", state)
  count = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(converted))
  head = sum(int(np.prod(v.shape)) for k, v in state.items() if k.startswith("head."))
  assert count == sum(int(np.prod(v.shape)) for v in state.values()) - head
  np.testing.assert_array_equal(converted["params"]["blocks_11"]["mlp"]["fc2"]["kernel"],
                                state["blocks.11.mlp.fc2.weight"].numpy().T)
