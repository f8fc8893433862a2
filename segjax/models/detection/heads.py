"""The RPN, box and mask heads of Mask R-CNN (He et al., ICCV 2017).

Laid out like torchvision.models.detection (rpn.RPNHead; faster_rcnn.
TwoMLPHead + FastRCNNPredictor; mask_rcnn.MaskRCNNHeads + MaskRCNNPredictor)
with the same param names, so `maskrcnn_resnet50_fpn` checkpoints convert
(segjax.convert, "maskrcnn_resnet50_fpn"):

  RPNHead        shared over levels: 3x3 conv + ReLU, 1x1 objectness (A),
                 1x1 box deltas (4A)
  BoxHead        TwoMLPHead (fc6 on the flattened ROI, fc7; 1024, ReLU) and
                 BoxPredictor (cls_score K+1, bbox_pred 4(K+1))
  MaskHead       four 3x3 convs (256, ReLU) and MaskPredictor (2x2/2
                 transposed conv + ReLU, 1x1 conv to K+1 mask logits)

`num_classes` counts the background, as torchvision's does (91 for COCO):
class 0 is background, K = num_classes - 1 object classes.

Layout differences from torchvision, all reshapes of the same numbers:
  - RPN outputs come flattened per level in torchvision's
    `permute_and_flatten` order, location-major (y, x, anchor), the order of
    segjax.ops.anchor_grid: objectness [N, H*W*A], deltas [N, H*W*A, 4].
  - fc6 reads the [R, 7, 7, C] ROI features without flattening: its kernel is
    [7, 7, C, 1024], which is torchvision's weight [1024, C*7*7] (flattened
    C, H, W from NCHW) reshaped, so no channel shuffle is needed at run time.
  - Box deltas are [R, K+1, 4] (torchvision's [R, 4(K+1)], class-major).
  - Mask logits are channels-last [R, M, M, K+1] (torchvision's
    [R, K+1, M, M]), as targets.mask_loss expects.
"""
import functools
from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models.layers import depth_to_space

Array = jax.Array
Dtype = Any

# torchvision's inits. RPN: normal(0.01), zero bias. nn.Linear's default
# kaiming_uniform(a=sqrt(5)) is U(+-1 / sqrt(fan_in)) (its bias draws from
# the same range; zeros here). Mask convs: kaiming normal, fan_out.
_rpn_init = nn.initializers.normal(0.01)
_linear_init = nn.initializers.variance_scaling(1.0 / 3, "fan_in", "uniform")
_mask_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class RPNHead(nn.Module):
  """Objectness and box deltas for every anchor of every level.

  Attributes:
    num_anchors: A, anchors per location (3 aspect ratios x 1 size per
      FPN level; 15 for the single C4 level).
    dtype: compute dtype; params stay float32, outputs are float32.
  """
  num_anchors: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[Array]) -> Tuple[list, list]:
    """Applies the same head to every level.

    Args:
      features: L maps [N, H_l, W_l, C], e.g. P2..P6.

    Returns:
      objectness: L arrays [N, H_l * W_l * A] float32 logits.
      deltas: L arrays [N, H_l * W_l * A, 4] float32 (dx, dy, dw, dh).
      Entry (y * W_l + x) * A + a belongs to anchor a at (y, x), the order
      of segjax.ops.anchor_grid and of torchvision's concatenated outputs.
    """
    a = self.num_anchors
    channels = features[0].shape[-1]
    conv = functools.partial(nn.Conv, dtype=self.dtype, kernel_init=_rpn_init)
    shared = conv(channels, (3, 3), padding=((1, 1), (1, 1)), name="conv")
    cls_logits = conv(a, (1, 1), name="cls_logits")
    bbox_pred = conv(4 * a, (1, 1), name="bbox_pred")
    objectness, deltas = [], []
    for f in features:
      t = nn.relu(shared(f.astype(self.dtype)))
      n, h, w, _ = t.shape
      objectness.append(cls_logits(t).astype(jnp.float32).reshape(n, h * w * a))
      # Channel a * 4 + c is delta c of anchor a (torchvision views the 4A
      # channels as [A, 4]), so the reshape keeps anchors location-major.
      deltas.append(bbox_pred(t).astype(jnp.float32).reshape(n, h * w * a, 4))
    return objectness, deltas


class BoxPredictor(nn.Module):
  """torchvision's FastRCNNPredictor: class logits and per-class box deltas.

  Attributes:
    num_classes: K + 1, background included.
    dtype: compute dtype; outputs are float32.
  """
  num_classes: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Tuple[Array, Array]:
    """x: [R, D] -> class_logits [R, K+1], box_deltas [R, K+1, 4], float32."""
    dense = functools.partial(nn.Dense, dtype=self.dtype,
                              kernel_init=_linear_init)
    logits = dense(self.num_classes, name="cls_score")(x)
    deltas = dense(4 * self.num_classes, name="bbox_pred")(x)
    return (logits.astype(jnp.float32),
            deltas.astype(jnp.float32).reshape(-1, self.num_classes, 4))


class BoxHead(nn.Module):
  """TwoMLPHead + BoxPredictor: the FPN Faster / Mask R-CNN box branch.

  Attributes:
    num_classes: K + 1, background included.
    representation_size: width of fc6 and fc7 (1024).
    dtype: compute dtype; params stay float32, outputs are float32.
  """
  num_classes: int
  representation_size: int = 1024
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pooled: Array) -> Tuple[Array, Array]:
    """Classifies and refines ROIs.

    Args:
      pooled: [R, P, P, C] ROI-aligned features (P = 7, C = 256).

    Returns:
      class_logits: [R, K+1] float32.
      box_deltas: [R, K+1, 4] float32, (dx, dy, dw, dh) per class, to be
        decoded with weights (10, 10, 5, 5).
    """
    x = pooled.astype(self.dtype)
    # fc6 contracts (H, W, C) at once: one matmul, like a flatten + Dense.
    x = nn.relu(nn.DenseGeneral(self.representation_size, axis=(-3, -2, -1),
                                dtype=self.dtype, kernel_init=_linear_init,
                                name="fc6")(x))
    x = nn.relu(nn.Dense(self.representation_size, dtype=self.dtype,
                         kernel_init=_linear_init, name="fc7")(x))
    return BoxPredictor(self.num_classes, dtype=self.dtype, name="predictor")(x)


class ConvTranspose2x2(nn.Module):
  """PyTorch's ConvTranspose2d(C_in, features, kernel_size=2, stride=2).

  kernel is [2, 2, features, C_in]: the HWIO kernel of the stride-2 conv
  this is the transpose of (lax.conv_transpose's transpose_kernel=True
  convention). That is PyTorch's weight [C_in, features, 2, 2] permuted
  (2, 3, 1, 0), the layout segjax.convert's "conv" kind produces, so the
  converter needs no special case. (layers.ConvTranspose2x computes the same
  function with flax's flipped [2, 2, C_in, features] kernel.)

  Output pixel (2i + a, 2j + b) is x[i, j] @ kernel[a, b].T: with kernel ==
  stride the windows do not overlap, so `impl="fast"` computes it as one
  matmul to 4 * features channels + depth-to-space (docs/design.md's
  performance notes); `impl="xla"` is lax.conv_transpose, the reference.

  Attributes:
    features: output channels.
    impl: "fast" or "xla".
    dtype: compute dtype; params stay float32.
  """
  features: int
  impl: str = "fast"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [N, H, W, C_in] -> [N, 2H, 2W, features] in `dtype`."""
    c_in = x.shape[-1]
    # PyTorch's kaiming fan_out of its weight [C_in, C_out, 2, 2] is 4 * C_in:
    # the fan_out flax computes for this [2, 2, C_out, C_in] kernel.
    kernel = self.param("kernel", _mask_init, (2, 2, self.features, c_in),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,),
                      jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if self.impl == "fast":
      # [C_in, (a, b, C_out)]: depth_to_space's (a * 2 + b) * C + c order.
      matrix = kernel.transpose(3, 0, 1, 2).reshape(c_in, 4 * self.features)
      y = depth_to_space(jnp.dot(x, matrix), 2)
    elif self.impl == "xla":
      y = jax.lax.conv_transpose(x, kernel, (2, 2), "VALID",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 transpose_kernel=True)
    else:
      raise ValueError(f"impl must be 'fast' or 'xla', got {self.impl!r}")
    return y + bias


class MaskPredictor(nn.Module):
  """torchvision's MaskRCNNPredictor: 2x upsampling and per-class logits.

  Also the whole mask head of the C4 variant (on res5's 7x7x2048 output).

  Attributes:
    num_classes: K + 1, background included.
    dim_reduced: channels of the transposed conv (256).
    impl: ConvTranspose2x2's implementation.
    dtype: compute dtype; outputs are float32.
  """
  num_classes: int
  dim_reduced: int = 256
  impl: str = "fast"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [R, S, S, C] -> mask logits [R, 2S, 2S, K+1] float32."""
    x = nn.relu(ConvTranspose2x2(self.dim_reduced, self.impl, self.dtype,
                                 name="conv5_mask")(x.astype(self.dtype)))
    logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype,
                     kernel_init=_mask_init, name="mask_fcn_logits")(x)
    return logits.astype(jnp.float32)


class MaskHead(nn.Module):
  """MaskRCNNHeads + MaskPredictor: the FPN Mask R-CNN mask branch.

  Attributes:
    num_classes: K + 1, background included.
    layers: channels of the 3x3 convs (four of 256).
    dilation: their dilation (1).
    dim_reduced: channels of the transposed conv (256).
    impl: ConvTranspose2x2's implementation.
    dtype: compute dtype; params stay float32, outputs are float32.
  """
  num_classes: int
  layers: Sequence[int] = (256, 256, 256, 256)
  dilation: int = 1
  dim_reduced: int = 256
  impl: str = "fast"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pooled: Array) -> Array:
    """Mask logits of every class for every ROI.

    Args:
      pooled: [R, P, P, C] ROI-aligned features (P = 14, C = 256).

    Returns:
      [R, 2P, 2P, K+1] float32 logits, channels-last (channel c is class c).
    """
    x = pooled.astype(self.dtype)
    d = self.dilation
    for i, channels in enumerate(self.layers):
      x = nn.relu(nn.Conv(channels, (3, 3), padding=((d, d), (d, d)),
                          kernel_dilation=(d, d), dtype=self.dtype,
                          kernel_init=_mask_init, name=f"mask_fcn{i + 1}")(x))
    return MaskPredictor(self.num_classes, self.dim_reduced, self.impl,
                         self.dtype, name="predictor")(x)
