"""UNet++ (Zhou et al., DLMIA 2018; IEEE TMI 2019): nested U-Nets.

Node X^{i,j} sits at down-sampling level i (resolution 1/2**i, width
base_width * 2**i) and column j of the skip pathway between encoder and
decoder:

  X^{i,0} = H(pool(X^{i-1,0}))                          the encoder (backbone)
  X^{i,j} = H([X^{i,0}, ..., X^{i,j-1}, Up(X^{i+1,j-1})])   j >= 1

with H two 3x3 conv + BN + ReLU blocks (the U-Net's) and Up a 2x upsampling
to X^{i,*}'s width: the 2x2 transposed conv (computed as a 1x1 conv + depth-
to-space, see layers.ConvTranspose2x) or bilinear resize + 1x1 conv. Nodes
exist for i + j <= L (L = `depth`); X^{0,1..L} are the outputs of the L
nested U-Nets of depths 1..L, which share one encoder.

Deep supervision: a 1x1 conv head to the classes on each X^{0,j}, j = 1..L.
In "accurate" mode (deep_supervision=True, the paper's UNet++) the logits are
the average of the L heads and all L are returned in outputs["aux"] for a
per-head loss; otherwise only X^{0,L} gets a head.

Pruning ("fast" mode): UNet++ L^k keeps only the nodes with i + j <= k and
predicts with X^{0,k}'s head. With `prune_level=k` this module builds exactly
that sub-network, so inference costs what a depth-k U-Net++ costs; its params
are a subset of the full (deep-supervised) model's, with the same names, so a
model trained with deep supervision is pruned by applying the pruned module
to the full variables (flax ignores the unused subtrees). The paper picks k
on validation data: the shallower heads are cheaper and often nearly as good.

Registered in segjax.models as "unet_pp".
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.errors import ConfigError
from segjax.models import layers

Array = jax.Array
Dtype = Any


def node_name(i: int, j: int) -> str:
  """Params-tree name of node X^{i,j}, e.g. "X_1_2"."""
  return f"X_{i}_{j}"


class UNetPlusPlus(nn.Module):
  """UNet++ for semantic segmentation.

  Attributes:
    num_classes: number of output classes K.
    depth: L, the number of 2x2 poolings (4 in the paper).
    base_width: channels at level 0 (32 in the paper); level i has
      base_width * 2**i (32, 64, 128, 256, 512).
    upsample: "transpose" (2x2 transposed conv, the paper's) or "bilinear"
      (bilinear resize + 1x1 conv).
    norm: "batch" (BatchNorm after every 3x3 conv) or "none".
    deep_supervision: heads on X^{0,1..L}; logits = their mean ("accurate"
      mode) and outputs["aux"] = the L per-head logits. Without it, one head
      on X^{0,L}.
    prune_level: None, or k in 1..L: build only the sub-network up to
      X^{0,k} ("fast" mode, UNet++ L^k) and return that head's logits.
    dtype: compute dtype (bfloat16 on accelerators); params are float32 and
      logits float32.
    bn_axis_name: pmap axis name for synchronised BatchNorm statistics.
  """
  num_classes: int
  depth: int = 4
  base_width: int = 32
  upsample: str = "transpose"
  norm: str = "batch"
  deep_supervision: bool = True
  prune_level: Optional[int] = None
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  def __post_init__(self):
    choices = {"upsample": ("transpose", "bilinear"), "norm": ("batch", "none")}
    for field, valid in choices.items():
      if getattr(self, field) not in valid:
        raise ConfigError(f"unet_pp: {field}={getattr(self, field)!r} is not "
                          f"supported; choose one of {', '.join(valid)}.")
    if self.num_classes < 1 or self.depth < 1 or self.base_width < 1:
      raise ConfigError(
          f"unet_pp: num_classes, depth and base_width must be >= 1, got "
          f"{self.num_classes}, {self.depth}, {self.base_width}.")
    if self.prune_level is not None and not 1 <= self.prune_level <= self.depth:
      raise ConfigError(f"unet_pp: prune_level must be None or in 1..depth "
                        f"(1..{self.depth}), got {self.prune_level}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> dict:
    """Segments a batch of images.

    Args:
      images: [N, H, W, C] float, normalised; any H, W >= 1.
      train: use batch statistics (and update batch_stats).

    Returns:
      {"logits": [N, H, W, K] float32}, plus "aux": a list of L [N, H, W, K]
      float32 logits of the heads on X^{0,1}, ..., X^{0,L} when
      deep_supervision is on and the model is not pruned.
    """
    if images.ndim != 4:
      raise ValueError(f"images must be [N, H, W, C], got {images.shape}")
    _, h, w, _ = images.shape
    levels = self.prune_level or self.depth
    width = lambda i: self.base_width * 2**i
    block = lambda i, j: layers.DoubleConv(width(i), "SAME", self.norm == "batch",
                                     self.dtype, self.bn_axis_name,
                                     name=node_name(i, j))
    if self.upsample == "transpose":
      up = lambda i, j: layers.ConvTranspose2x(width(i), dtype=self.dtype,
                                               name=f"up_{i}_{j}")
    else:
      up = lambda i, j: layers.BilinearUp2x(width(i), dtype=self.dtype,
                                            name=f"up_{i}_{j}")

    # Pad to a multiple of 2**depth even when pruned: a pruned model then sees
    # exactly the input the full model saw, so its output equals the full
    # model's head k at every pixel (and image border) for any H, W.
    scale = 2**self.depth
    x = images
    if h % scale or w % scale:
      x = jnp.pad(x, [(0, 0), (0, -h % scale), (0, -w % scale), (0, 0)])
    x = x.astype(self.dtype)

    nodes = {}  # (i, j) -> [N, H / 2**i, W / 2**i, width(i)]
    nodes[0, 0] = block(0, 0)(x, train)
    for i in range(1, levels + 1):
      pooled = nn.max_pool(nodes[i - 1, 0], (2, 2), strides=(2, 2))
      nodes[i, 0] = block(i, 0)(pooled, train)
    # Column by column: X^{i,j} needs X^{i+1,j-1}, from the previous column.
    for j in range(1, levels + 1):
      for i in range(levels - j + 1):
        inputs = [nodes[i, k] for k in range(j)]
        inputs.append(up(i, j)(nodes[i + 1, j - 1]))
        nodes[i, j] = block(i, j)(jnp.concatenate(inputs, axis=-1), train)

    def head(j):
      logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype,
                       name=f"head_{j}")(nodes[0, j])
      return logits[:, :h, :w, :].astype(jnp.float32)

    if self.prune_level is not None or not self.deep_supervision:
      return {"logits": head(levels)}
    heads = [head(j) for j in range(1, levels + 1)]
    # The paper's accurate mode averages the branches' outputs; averaging
    # logits keeps "logits" a logit that every loss can take.
    return {"logits": sum(heads) / len(heads), "aux": heads}
