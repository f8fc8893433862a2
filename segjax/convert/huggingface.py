"""Mapping tables for Hugging Face transformers' SegFormer.

  segformer_b0 .. segformer_b5
      `SegformerForSemanticSegmentation` state dicts ("segformer.…",
      "decode_head.…", e.g. nvidia/segformer-b0-finetuned-ade-512-512)
      -> the registry models of the same name.
  mit_b0 .. mit_b5
      the encoder alone: `SegformerModel` state dicts (no prefix), or
      `SegformerForImageClassification` ones ("segformer.…" + the ImageNet
      "classifier.*", dropped; e.g. nvidia/mit-b0) -> backbones.mit
      variables, i.e. params["backbone"] of the SegFormer models (see
      segjax.weights.mit_into). A segmentation checkpoint's "decode_head.*"
      is dropped too, so its encoder alone can seed another model.

HF renamed the SegFormer modules in transformers 5 ("encoder.block.0.1.
attention.self.query" became "stages.0.blocks.1.attention.q_proj", ...) and
renames checkpoints on load; the files on the hub keep the old names. Both
layouts are accepted: the table follows whichever the state dict uses.
Depthwise conv weights [C, 1, 3, 3] are ordinary "conv" rows (kernel
[3, 3, 1, C], flax's feature_group_count layout).
"""
import re
from typing import Callable, Dict, List, Mapping, Tuple

from segjax.convert import engine
from segjax.errors import CheckpointError
from segjax.models import segformer as segformer_lib
from segjax.models.backbones import mit as mit_lib

# HF module names: "hub" is the checkpoints' (transformers 4) layout, "v5"
# transformers 5's. {s} is the stage, {b} the block, {i} the decoder input.
_NAMES = {
    "hub": dict(
        patch="encoder.patch_embeddings.{s}", block="encoder.block.{s}.{b}",
        stage_norm="encoder.layer_norm.{s}", norm1="layer_norm_1",
        query="attention.self.query", key="attention.self.key",
        value="attention.self.value", sr="attention.self.sr",
        sr_norm="attention.self.layer_norm", proj="attention.output.dense",
        norm2="layer_norm_2", fc1="mlp.dense1", dwconv="mlp.dwconv.dwconv",
        fc2="mlp.dense2", linear_c="decode_head.linear_c.{i}.proj"),
    "v5": dict(
        patch="stages.{s}.patch_embeddings", block="stages.{s}.blocks.{b}",
        stage_norm="stages.{s}.layer_norm", norm1="layernorm_before",
        query="attention.q_proj", key="attention.k_proj",
        value="attention.v_proj",
        sr="attention.sequence_reduction.sequence_reduction",
        sr_norm="attention.sequence_reduction.layer_norm",
        proj="attention.o_proj", norm2="layernorm_after", fc1="mlp.fc1",
        dwconv="mlp.dwconv.dwconv", fc2="mlp.fc2",
        linear_c="decode_head.linear_projections.{i}.proj"),
}
_CLASSIFIER = "decode_head.classifier.weight"


def _layout(state: Mapping[str, object]) -> Dict[str, str]:
  """The naming of `state`: transformers 5's if it has "stages.*" keys."""
  v5 = any(re.match(r"(segformer\.)?stages\.\d", k) for k in state)
  return _NAMES["v5" if v5 else "hub"]


def encoder_rows(torch_prefix: str, flax_path: Tuple[str, ...], model,
                 names: Mapping[str, str]) -> List[engine.Row]:
  """Rows for a MiT encoder under `torch_prefix` (e.g. "segformer.").

  `model` is anything with MixTransformer's depths and sr_ratios.
  """
  rows = []
  for s, depth in enumerate(model.depths):
    t = torch_prefix + names["patch"].format(s=s)
    f = flax_path + (f"patch_embed{s}",)
    rows += [(f"{t}.proj", f + ("proj",), "conv"),
             (f"{t}.layer_norm", f + ("norm",), "layernorm")]
    for b in range(depth):
      t = torch_prefix + names["block"].format(s=s, b=b)
      f = flax_path + (f"block{s}_{b}",)
      rows += [(f"{t}.{names['norm1']}", f + ("norm1",), "layernorm"),
               (f"{t}.{names['norm2']}", f + ("norm2",), "layernorm"),
               (f"{t}.{names['fc1']}", f + ("ffn", "fc1"), "linear"),
               (f"{t}.{names['dwconv']}", f + ("ffn", "dwconv"), "conv"),
               (f"{t}.{names['fc2']}", f + ("ffn", "fc2"), "linear")]
      for ours in ("query", "key", "value", "proj"):
        rows.append((f"{t}.{names[ours]}", f + ("attn", ours), "linear"))
      if model.sr_ratios[s] > 1:
        rows += [(f"{t}.{names['sr']}", f + ("attn", "sr"), "conv"),
                 (f"{t}.{names['sr_norm']}", f + ("attn", "sr_norm"),
                  "layernorm")]
    rows.append((torch_prefix + names["stage_norm"].format(s=s),
                 flax_path + (f"norm{s}",), "layernorm"))
  return rows


def decode_head_rows(num_stages: int,
                     names: Mapping[str, str]) -> List[engine.Row]:
  """Rows for HF's SegformerDecodeHead -> params["decode_head"]."""
  f = ("decode_head",)
  rows = [(names["linear_c"].format(i=i), f + (f"linear_c{i}",), "linear")
          for i in range(num_stages)]
  return rows + [("decode_head.linear_fuse", f + ("linear_fuse",), "conv"),
                 ("decode_head.batch_norm", f + ("batch_norm",), "bn"),
                 ("decode_head.classifier", f + ("classifier",), "conv")]


def _encoder_hint(state: Mapping[str, object], prefix: str,
                  names: Mapping[str, str], model) -> List[str]:
  """Says which widths/depths the checkpoint's encoder has, if they differ."""
  widths, depths = [], []
  for s in range(8):
    key = f"{prefix}{names['patch'].format(s=s)}.proj.weight"
    if key not in state:
      break
    widths.append(int(state[key].shape[0]))
    block = re.escape(prefix + names["block"].format(s=s, b="@")).replace(
        "@", r"(\d+)")
    blocks = {int(m.group(1)) for k in state
              for m in [re.match(block + r"\.", k)] if m}
    depths.append(max(blocks) + 1 if blocks else 0)
  if widths and (tuple(widths) != tuple(model.hidden_sizes)
                 or tuple(depths) != tuple(model.depths)):
    sizes = [n for n, v in mit_lib.SIZES.items()
             if tuple(v["hidden_sizes"]) == tuple(widths)
             and tuple(v["depths"]) == tuple(depths)]
    like = f" (MiT-{sizes[0].upper()})" if sizes else ""
    return [f"the checkpoint's encoder has hidden_sizes={tuple(widths)}, "
            f"depths={tuple(depths)}{like}; use the converter of that size "
            "or pass those options."]
  return []


def _segformer(size: str):
  def mapping(state, num_classes=None, **kwargs):
    if num_classes is None:
      if _CLASSIFIER not in state:
        raise CheckpointError(
            f"the checkpoint has no {_CLASSIFIER}, so the number of classes "
            "is unknown; pass num_classes=..., and check that this is a "
            "SegformerForSemanticSegmentation state dict (for an encoder "
            f"alone, e.g. nvidia/mit-{size}, use the converter 'mit_{size}').")
      num_classes = int(state[_CLASSIFIER].shape[0])
    options = dict(mit_lib.SIZES[size],
                   decoder_width=segformer_lib.DECODER_WIDTHS[size])
    model = segformer_lib.SegFormer(num_classes=num_classes,
                                    **{**options, **kwargs})
    names = _layout(state)
    rows = encoder_rows("segformer.", ("backbone",), model, names)
    rows += decode_head_rows(len(model.depths), names)
    hints = engine.classes_hint(state, _CLASSIFIER, num_classes)
    hints += _encoder_hint(state, "segformer.", names, model)
    return engine.Conversion(model, rows, state, hints)
  return mapping


def _mit(size: str):
  def mapping(state, **kwargs):
    # Heads the encoder has no use for: ImageNet's classifier, a
    # segmentation checkpoint's decoder.
    state = engine.strip_prefix(state, "classifier.")
    state = engine.strip_prefix(state, "decode_head.")
    if state and all(k.startswith("segformer.") for k in state):
      state = {k[len("segformer."):]: v for k, v in state.items()}
    model = mit_lib.MixTransformer(**{**mit_lib.SIZES[size], **kwargs})
    names = _layout(state)
    return engine.Conversion(model, encoder_rows("", (), model, names), state,
                             _encoder_hint(state, "", names, model))
  return mapping


HUGGINGFACE: Dict[str, Callable[..., engine.Conversion]] = {
    **{f"segformer_{size}": _segformer(size) for size in mit_lib.SIZES},
    **{f"mit_{size}": _mit(size) for size in mit_lib.SIZES},
}
