"""SETR (Zheng et al., CVPR 2021): a plain ViT encoder and three decoders.

  model = segjax.models.build("setr_pup", num_classes=150)          # ViT-L
  model = segjax.models.build("setr_mla", num_classes=19, size="base", aux=True)

The encoder is a ViT-B/16 or ViT-L/16 (backbones/vit.py, `size`), its
position embeddings stored at timm's 384-pixel pretraining grid (24 x 24) and
resized (bicubic) to the input's grid on every call, so one model takes any
input size. (mmseg instead resizes the table once, when loading the
checkpoint, to the training crop's grid, bilinearly in its SETR configs, and
learns it there.) The decoders follow the paper and
mmsegmentation's SETR configs (SETRUPHead, MLANeck, SETRMLAHead), with BN
and ReLU after every decoder conv, 256 channels, bilinear upsampling with
align_corners=False:

  setr_naive  the last layer -> LayerNorm -> 1x1 conv, BN, ReLU -> 1x1 conv
              to classes -> one bilinear upsampling to the input (the paper's
              and the official code's; mmseg's port upsamples 4x twice).
  setr_pup    the last layer -> LayerNorm -> 4 x (3x3 conv, BN, ReLU, 2x
              bilinear) -> 1x1 conv to classes (1/16 -> full resolution).
  setr_mla    layers evenly spaced over the depth (6/12/18/24 of ViT-L's 24,
              `mla_layers`) -> per level LayerNorm, 1x1 conv, BN, ReLU; top-down
              aggregation (each level adds the sum of the deeper ones) and a
              3x3 conv, BN, ReLU per level (the "neck") -> per level two 3x3
              convs (128 channels), BN, ReLU, 4x bilinear -> concatenation ->
              conv to classes (3x3 as the paper and official code; mmseg 1.x
              uses 1x1, `mla_classifier_kernel`) -> 4x bilinear.

With `aux=True` the auxiliary heads of mmseg's ADE20K/Cityscapes configs
(mmseg sums their losses with weight 0.4 each; segjax's
`loss.kwargs.aux_weight` multiplies their mean, so 0.4 x the number of
heads): for Naive and PUP one head per
intermediate layer (`aux_layers`: 10/15/20 of ViT-L's 24) of the same form
with two convs (1x1 for Naive, 3x3 for PUP) and two 4x upsamplings; for MLA
a 1x1 conv to classes on each of the neck's four outputs. Their logits, at
input resolution, are outputs["aux"].

Top-level modules: "backbone", "neck" (MLA), "decode_head" and
"auxiliary_head", so the paper's 10x head learning rate is
`optimizer.lr_mult={"decode_head": 10.0, "auxiliary_head": 10.0}` (mmseg's
custom_keys={'head': lr_mult=10}, which leaves the MLA neck at 1x).

Any input size works: the ViT pads the bottom and right to a multiple of 16,
and the logits, upsampled to the padded size, are cropped back to the input,
so each logit stays aligned with its pixel (mmseg instead resizes the padded
logits onto the input, shifting them by up to 15 pixels' worth).
"""
import functools
from typing import Any, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.errors import ConfigError
from segjax.models.backbones import vit as vit_lib
from segjax.models.layers import ConvBNAct
from segjax.ops import resize

Array = jax.Array
Dtype = Any

DECODERS = ("naive", "pup", "mla")
# The ViT's patch size: the decoders' upsampling (PUP's 4 x 2x) assumes it.
PATCH = 16


def mla_layers(depth: int) -> Tuple[int, ...]:
  """The 4 blocks MLA reads, 0-based: evenly spaced, the last included.

  ViT-L (24): (5, 11, 17, 23), the paper's layers 6/12/18/24; ViT-B (12):
  (2, 5, 8, 11).
  """
  return tuple(depth * (i + 1) // 4 - 1 for i in range(4))


def aux_layers(depth: int) -> Tuple[int, ...]:
  """The blocks Naive/PUP's auxiliary heads read, 0-based.

  mmseg's out_indices (9, 14, 19) for ViT-L's 24 blocks (layers 10, 15, 20);
  the same fractions of the depth, rounded, for other depths (ViT-B:
  (4, 7, 9)).
  """
  return tuple(max(round(depth * k / 24) - 1, 0) for k in (10, 15, 20))


def _upsample(x: Array, factor: int) -> Array:
  """Bilinear (align_corners=False) upsampling of [N, h, w, C] by `factor`."""
  if factor == 1:
    return x
  return resize(x, (x.shape[1] * factor, x.shape[2] * factor))


class UpHead(nn.Module):
  """SETR's naive / progressive upsampling head (mmseg's SETRUPHead).

  LayerNorm over the tokens' channels, then `num_convs` x (conv, BN, ReLU,
  `up_scale`x bilinear), then a 1x1 conv to classes. The classifier runs
  before the last upsampling: a 1x1 conv and bilinear resizing commute
  exactly (the weights of each output pixel sum to 1, so the bias passes
  through), and K class channels are cheaper to upsample than `channels`.
  """
  num_classes: int
  channels: int = 256
  num_convs: int = 1
  kernel_size: int = 1
  up_scale: int = 4
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """x: [N, h, w, C] -> [N, h * s, w * s, K] float32, s = up_scale^num_convs."""
    x = nn.LayerNorm(epsilon=vit_lib.LN_EPSILON, dtype=self.dtype,
                     name="norm")(x)
    k = self.kernel_size
    for i in range(self.num_convs):
      if i:
        x = _upsample(x, self.up_scale)
      x = ConvBNAct(self.channels, (k, k), dtype=self.dtype,
                    bn_axis_name=self.bn_axis_name, name=f"conv{i}")(x, train)
    logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype,
                     name="classifier")(x)
    return _upsample(logits.astype(jnp.float32),
                     self.up_scale if self.num_convs else 1)


class MLANeck(nn.Module):
  """Multi-level feature aggregation (mmseg's MLANeck).

  Per level: LayerNorm, 1x1 conv + BN + ReLU to `channels`. Top-down: level
  i gets the sum of its projection and every deeper one (a running sum from
  the deepest), then a 3x3 conv + BN + ReLU.
  """
  channels: int = 256
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, features: Sequence[Array], train: bool) -> List[Array]:
    """features: shallow to deep, each [N, h, w, C] -> the same number of
    [N, h, w, channels] maps, same order."""
    conv = functools.partial(ConvBNAct, self.channels, dtype=self.dtype,
                             bn_axis_name=self.bn_axis_name)
    projected = []
    for i, x in enumerate(features):
      x = nn.LayerNorm(epsilon=vit_lib.LN_EPSILON, dtype=self.dtype,
                       name=f"norm{i}")(x)
      projected.append(conv((1, 1), name=f"proj{i}")(x, train))
    summed, running = [None] * len(projected), None
    for i in reversed(range(len(projected))):
      running = projected[i] if running is None else running + projected[i]
      summed[i] = running
    return [conv((3, 3), name=f"fuse{i}")(x, train)
            for i, x in enumerate(summed)]


class MLAHead(nn.Module):
  """SETR-MLA's head (mmseg's SETRMLAHead): per level two 3x3 conv + BN +
  ReLU to `channels` and `up_scale`x bilinear, concatenated, then a conv to
  classes."""
  num_classes: int
  channels: int = 128
  up_scale: int = 4
  classifier_kernel: int = 3
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, levels: Sequence[Array], train: bool) -> Array:
    """levels: each [N, h, w, C] -> [N, h * up_scale, w * up_scale, K] float32."""
    outs = []
    for i, x in enumerate(levels):
      for j in range(2):
        x = ConvBNAct(self.channels, (3, 3), dtype=self.dtype,
                      bn_axis_name=self.bn_axis_name,
                      name=f"level{i}_conv{j}")(x, train)
      outs.append(_upsample(x, self.up_scale))
    k = self.classifier_kernel
    logits = nn.Conv(self.num_classes, (k, k), dtype=self.dtype,
                     name="classifier")(jnp.concatenate(outs, -1))
    return logits.astype(jnp.float32)


class AuxHeads(nn.Module):
  """One auxiliary head per feature map: an UpHead with two convs of
  `kernel_size` and two 4x upsamplings (Naive/PUP), or with kernel_size None
  a 1x1 conv to classes (MLA, mmseg's FCNHead with num_convs=0)."""
  num_classes: int
  channels: int = 256
  kernel_size: Optional[int] = None
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, features: Sequence[Array], train: bool) -> List[Array]:
    """features: each [N, h, w, C] -> logits [N, h', w', K] float32 each."""
    outs = []
    for j, x in enumerate(features):
      if self.kernel_size is None:
        y = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype,
                    name=f"head{j}")(x).astype(jnp.float32)
      else:
        y = UpHead(self.num_classes, self.channels, num_convs=2,
                   kernel_size=self.kernel_size, up_scale=4, dtype=self.dtype,
                   bn_axis_name=self.bn_axis_name, name=f"head{j}")(x, train)
      outs.append(y)
    return outs


class SETR(nn.Module):
  """ViT encoder + a SETR decoder.

  Attributes:
    num_classes: output classes K.
    decoder: "naive", "pup" or "mla".
    size: the ViT, "base" (ViT-B/16) or "large" (ViT-L/16, the paper's).
    width, depth, num_heads: override the size's ViT shape (e.g. tiny
      models for tests and CPU runs).
    pretrain_grid: (rows, cols) of the stored position embeddings; timm's
      vit_*_patch16_384 weights have (24, 24).
    class_token: run the ViT with a class token; None: the decoder's mmseg
      default (Naive/PUP with, MLA without).
    final_norm: apply the ViT's final LayerNorm to its outputs (mmseg's
      SETR does not; the heads normalise their inputs).
    drop_path_rate: the ViT's stochastic depth (mmseg's SETR: 0).
    channels: decoder channels (Naive/PUP convs, the MLA neck), 256.
    mla_head_channels: MLA head channels per level, 128.
    mla_classifier_kernel: MLA's classifier conv, 3 (paper) or 1 (mmseg 1.x).
    aux: add the auxiliary heads; outputs["aux"] holds their logits.
    aux_layers: the blocks Naive/PUP's auxiliary heads read (0-based);
      None: `aux_layers(depth)`.
    pos_embed_antialias: see backbones.vit.ViT.
    attention_impl: "auto", "xla", "cudnn" or "einsum".
    dtype: compute dtype; params, BN statistics and logits stay float32.
    bn_axis_name: pmap axis for BatchNorm statistics (None under jit).
    remat: recompute the encoder's blocks in the backward pass instead of
      storing their activations (segjax.models.remat).
  """
  num_classes: int
  decoder: str = "pup"
  size: str = "large"
  width: Optional[int] = None
  depth: Optional[int] = None
  num_heads: Optional[int] = None
  pretrain_grid: Tuple[int, int] = vit_lib.PRETRAIN_GRID
  class_token: Optional[bool] = None
  final_norm: bool = False
  drop_path_rate: float = 0.0
  channels: int = 256
  mla_head_channels: int = 128
  mla_classifier_kernel: int = 3
  aux: bool = False
  aux_layers: Optional[Sequence[int]] = None
  pos_embed_antialias: bool = False
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None
  remat: bool = False

  def __post_init__(self):
    # Configs read back from config.json hold lists; a module must hash
    # (jit takes it as a static argument).
    for name in ("pretrain_grid", "aux_layers"):
      if getattr(self, name) is not None:
        object.__setattr__(self, name, tuple(getattr(self, name)))
    super().__post_init__()

  def vit_shape(self) -> dict:
    """{width, depth, num_heads} of the encoder: `size` with overrides."""
    if self.size not in vit_lib.SIZES:
      raise ConfigError(f"SETR size {self.size!r} is not one of "
                        f"{', '.join(vit_lib.SIZES)}.")
    shape = dict(vit_lib.SIZES[self.size])
    for key in shape:
      if getattr(self, key) is not None:
        shape[key] = getattr(self, key)
    return shape

  def encoder_layers(self) -> Tuple[int, ...]:
    """Blocks the decoder reads (0-based), the main input last for Naive/PUP."""
    depth = self.vit_shape()["depth"]
    if self.decoder == "mla":
      return mla_layers(depth)
    extra = ()
    if self.aux:
      extra = tuple(self.aux_layers if self.aux_layers is not None
                    else aux_layers(depth))
    return extra + (depth - 1,)

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> dict:
    """images: [N, H, W, 3] -> {"logits": [N, H, W, K] float32} (+ "aux")."""
    if self.decoder not in DECODERS:
      raise ConfigError(f"SETR decoder {self.decoder!r} is not one of "
                        f"{', '.join(DECODERS)}.")
    _, h, w, _ = images.shape
    class_token = (self.decoder != "mla" if self.class_token is None
                   else self.class_token)
    features = vit_lib.ViT(
        **self.vit_shape(), patch_size=PATCH,
        pretrain_grid=tuple(self.pretrain_grid),
        class_token=class_token, out_indices=self.encoder_layers(),
        final_norm=self.final_norm, drop_path_rate=self.drop_path_rate,
        pos_embed_antialias=self.pos_embed_antialias,
        attention_impl=self.attention_impl, dtype=self.dtype,
        remat=self.remat, name="backbone")(images, train)
    gh, gw = features[0].shape[1:3]
    padded = (gh * PATCH, gw * PATCH)

    def to_input(logits):  # the padded image's logits, cropped to the input
      return resize(logits.astype(jnp.float32), padded)[:, :h, :w]

    common = dict(dtype=self.dtype, bn_axis_name=self.bn_axis_name)
    if self.decoder == "mla":
      levels = MLANeck(self.channels, name="neck", **common)(features, train)
      logits = MLAHead(self.num_classes, self.mla_head_channels,
                       classifier_kernel=self.mla_classifier_kernel,
                       name="decode_head", **common)(levels, train)
      aux_inputs, aux_kernel = levels, None
    else:
      naive = self.decoder == "naive"
      head = UpHead(self.num_classes, self.channels,
                    num_convs=1 if naive else 4,
                    kernel_size=1 if naive else 3,
                    up_scale=1 if naive else 2, name="decode_head", **common)
      logits = head(features[-1], train)
      aux_inputs, aux_kernel = features[:-1], 1 if naive else 3
    outputs = {"logits": to_input(logits)}
    if self.aux:
      aux = AuxHeads(self.num_classes, self.channels, aux_kernel,
                     name="auxiliary_head", **common)(aux_inputs, train)
      outputs["aux"] = [to_input(a) for a in aux]
    return outputs


SETRNaive = functools.partial(SETR, decoder="naive")
SETRPUP = functools.partial(SETR, decoder="pup")
SETRMLA = functools.partial(SETR, decoder="mla")
