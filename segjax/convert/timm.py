"""Mapping tables for timm's Vision Transformers.

  vit_base_patch16_384, vit_large_patch16_384
      timm `VisionTransformer` state dicts (e.g. timm.create_model(
      "vit_large_patch16_384", pretrained=True).state_dict(), or the
      jx_vit_large_p16_384-b3be5167.pth file SETR starts from)
      -> backbones.vit.ViT variables, i.e. params["backbone"] of the SETR
      models (see segjax.weights.vit_into).

The classification parts are dropped: the ImageNet "head.*", and
"fc_norm.*" / "pre_logits.*" where a variant has them (norms and layers of
the pooled token, which dense prediction does not pool). timm's layout is
kept one to one (backbones/vit.py); only the two raw tensors need kinds of
their own: "cls_token" [1, 1, C] and "pos_embed" [1, 1 + gh*gw, C].

Options (keyword arguments of the converter):
  class_token: False for a model without one (SETR-MLA): the checkpoint's
    token and its position-embedding row are dropped. Default: whether the
    checkpoint has "cls_token".
  final_norm: False for a model without the final LayerNorm (SETR's
    default): the checkpoint's "norm.*" is dropped. Default True.
  pretrain_grid: read from pos_embed's length (a square grid) unless given.
  and any other backbones.vit.ViT option (width, depth, num_heads, dtype...).
"""
import math
import re
from typing import Callable, Dict, List, Mapping, Tuple

from segjax.convert import engine
from segjax.errors import CheckpointError
from segjax.models.backbones import vit as vit_lib

# The classifier of the pooled token, which a dense model never computes.
_CLASSIFICATION_PREFIXES = ("head.", "fc_norm.", "pre_logits.")


def vit_rows(flax_path: Tuple[str, ...], depth: int, class_token: bool,
             final_norm: bool) -> List[engine.Row]:
  """Rows for a timm VisionTransformer (no prefix) -> ViT at `flax_path`."""
  rows = [("patch_embed.proj", flax_path + ("patch_embed",), "conv"),
          ("pos_embed", flax_path, "pos_embed")]
  if class_token:
    rows.append(("cls_token", flax_path, "cls_token"))
  for i in range(depth):
    t, f = f"blocks.{i}", flax_path + (f"blocks_{i}",)
    rows += [(f"{t}.norm1", f + ("norm1",), "layernorm"),
             (f"{t}.attn.qkv", f + ("attn", "qkv"), "linear"),
             (f"{t}.attn.proj", f + ("attn", "proj"), "linear"),
             (f"{t}.norm2", f + ("norm2",), "layernorm"),
             (f"{t}.mlp.fc1", f + ("mlp", "fc1"), "linear"),
             (f"{t}.mlp.fc2", f + ("mlp", "fc2"), "linear")]
  if final_norm:
    rows.append(("norm", flax_path + ("norm",), "layernorm"))
  return rows


def _shape_hint(state: Mapping[str, object], model) -> List[str]:
  """Says which ViT the checkpoint holds if its width or depth differ."""
  if "pos_embed" not in state:
    return []
  width = int(state["pos_embed"].shape[-1])
  depth = 1 + max((int(m.group(1)) for k in state
                   for m in [re.match(r"blocks\.(\d+)\.", k)] if m), default=-1)
  if (width, depth) == (model.width, model.depth):
    return []
  sizes = [name for name, v in vit_lib.SIZES.items()
           if (v["width"], v["depth"]) == (width, depth)]
  like = f" (ViT-{sizes[0][0].upper()}, size='{sizes[0]}')" if sizes else ""
  return [f"the checkpoint's ViT has width {width} and depth {depth}{like}; "
          f"the model has width {model.width} and depth {model.depth}."]


def _vit(size: str):
  def mapping(state, class_token=None, final_norm=True, pretrain_grid=None,
              **kwargs):
    for prefix in _CLASSIFICATION_PREFIXES:
      state = engine.strip_prefix(state, prefix)
    has_token = "cls_token" in state
    if class_token is None:
      class_token = has_token or not state
    if not class_token and has_token:
      # A model without a class token (SETR-MLA) never adds its embedding.
      state = dict(state)
      del state["cls_token"]
      if "pos_embed" in state:
        state["pos_embed"] = state["pos_embed"][:, 1:]
    if not final_norm:
      state = engine.strip_prefix(state, "norm.")
    if pretrain_grid is None:
      pretrain_grid = vit_lib.PRETRAIN_GRID
      if "pos_embed" in state:
        tokens = state["pos_embed"].shape[1] - int(class_token)
        side = math.isqrt(tokens)
        if side * side != tokens:
          raise CheckpointError(
              f"pos_embed holds {tokens} patch positions, not a square grid; "
              "pass pretrain_grid=(rows, cols).")
        pretrain_grid = (side, side)
    options = {**vit_lib.SIZES[size], **kwargs}
    model = vit_lib.ViT(class_token=class_token, final_norm=final_norm,
                        pretrain_grid=tuple(pretrain_grid), **options)
    rows = vit_rows((), model.depth, class_token, final_norm)
    return engine.Conversion(model, rows, state, _shape_hint(state, model))
  return mapping


TIMM: Dict[str, Callable[..., engine.Conversion]] = {
    f"vit_{size}_patch16_384": _vit(size) for size in vit_lib.SIZES
}
