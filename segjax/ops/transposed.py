"""Transposed convolution with PyTorch ConvTranspose2d's sizes and padding.

XLA lowers a transposed convolution to a convolution over a zero-stuffed
input, which wastes stride**2 of its multiplies and is slow on CPU and cuDNN
(docs/design.md, "Performance notes"). The same function is a "sub-pixel" convolution: output pixel
(s*q + r) only ever meets kernel taps r, r + s, r + 2s, ..., so one ordinary
convolution with ceil(k/s) taps and s*s*C_out output channels, followed by
depth-to-space, computes every phase at once. `impl="xla"` keeps the plain
lowering as the reference the fast form is tested against.

Kernel layout: [kh, kw, C_in, C_out], the PyTorch weight [C_in, C_out, kh, kw]
transposed by (2, 3, 0, 1), so that
  y[s*i + a - p, s*j + b - p, o] += x[i, j, c] * kernel[a, b, c, o].
"""

import jax
import jax.numpy as jnp

from segjax.errors import ConfigError
from segjax.ops.pairs import IntPair, pair


def conv_transpose_output_size(in_size: int, kernel: int, stride: int,
                               padding: int = 0, output_padding: int = 0,
                               dilation: int = 1) -> int:
  """PyTorch ConvTranspose2d's output length along one axis."""
  return ((in_size - 1) * stride - 2 * padding + dilation * (kernel - 1)
          + output_padding + 1)


def _crop_or_pad(y, axis, start, length):
  """y[start:start+length] along axis, zero-filled where that runs past y."""
  n = y.shape[axis]
  pad_hi = max(0, start + length - n)
  if pad_hi:
    widths = [(0, 0)] * y.ndim
    widths[axis] = (0, pad_hi)
    y = jnp.pad(y, widths)
  return jax.lax.slice_in_dim(y, start, start + length, axis=axis)


def _xla(x, kernel, stride, padding, output_padding, dilation):
  (sh, sw), (ph, pw), (oph, opw), (dh, dw) = stride, padding, output_padding, dilation
  kh, kw = kernel.shape[:2]
  # Full transposed conv = correlation of the zero-stuffed input with the
  # flipped kernel, padded by the dilated kernel extent minus one; PyTorch's
  # padding crops both sides, output_padding extends the far side.
  eh, ew = dh * (kh - 1), dw * (kw - 1)
  y = jax.lax.conv_general_dilated(
      x, kernel[::-1, ::-1], window_strides=(1, 1),
      padding=((eh, eh + oph), (ew, ew + opw)), lhs_dilation=(sh, sw),
      rhs_dilation=(dh, dw), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)
  oh = conv_transpose_output_size(x.shape[1], kh, sh, ph, oph, dh)
  ow = conv_transpose_output_size(x.shape[2], kw, sw, pw, opw, dw)
  y = _crop_or_pad(y, 1, ph, oh)
  return _crop_or_pad(y, 2, pw, ow)


def _subpixel(x, kernel, stride, padding, output_padding):
  (sh, sw), (ph, pw), (oph, opw) = stride, padding, output_padding
  n, h, w, cin = x.shape
  kh, kw, _, cout = kernel.shape
  mh, mw = -(-kh // sh), -(-kw // sw)
  # Pad taps to mh*sh x mw*sw, then phase r, tap m is kernel[r + s*m].
  k = jnp.pad(kernel, ((0, mh * sh - kh), (0, mw * sw - kw), (0, 0), (0, 0)))
  k = k.reshape(mh, sh, mw, sw, cin, cout)
  # Output q of phase r sums x[q - m] * k[m]: a correlation with the taps
  # reversed, over x padded by m - 1 on both sides.
  k = k[::-1, :, ::-1]
  k = k.transpose(0, 2, 4, 1, 3, 5).reshape(mh, mw, cin, sh * sw * cout)
  y = jax.lax.conv_general_dilated(
      x, k, window_strides=(1, 1), padding=((mh - 1, mh - 1), (mw - 1, mw - 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)
  qh, qw = h + mh - 1, w + mw - 1
  y = y.reshape(n, qh, qw, sh, sw, cout).transpose(0, 1, 3, 2, 4, 5)
  y = y.reshape(n, qh * sh, qw * sw, cout)
  oh = conv_transpose_output_size(h, kh, sh, ph, oph)
  ow = conv_transpose_output_size(w, kw, sw, pw, opw)
  y = _crop_or_pad(y, 1, ph, oh)
  return _crop_or_pad(y, 2, pw, ow)


def conv_transpose(x: jax.Array, kernel: jax.Array, stride: IntPair,
                   padding: IntPair = 0, output_padding: IntPair = 0,
                   dilation: IntPair = 1, *, impl: str = "auto") -> jax.Array:
  """Equals PyTorch `ConvTranspose2d(stride, padding, output_padding, dilation)`.

  Args:
    x: [N, H, W, C_in].
    kernel: [kh, kw, C_in, C_out]; PyTorch's weight.permute(2, 3, 0, 1).
    stride, padding, output_padding, dilation: ints or (h, w) pairs with
      PyTorch's meaning; output_padding must be < max(stride, dilation).
    impl: "subpixel" (one dense conv + depth-to-space), "xla" (lhs-dilated
      conv), or "auto" (subpixel unless dilation > 1).

  Returns:
    [N, (H-1)*s - 2p + d*(kh-1) + op + 1, ..., C_out]. Add the bias yourself.
  """
  stride, padding = pair(stride, "stride"), pair(padding, "padding")
  output_padding, dilation = pair(output_padding, "output_padding"), pair(dilation, "dilation")
  if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[2] != x.shape[3]:
    raise ConfigError(
        f"conv_transpose wants x [N, H, W, C_in] and kernel [kh, kw, C_in, C_out]; "
        f"got {x.shape} and {kernel.shape}.")
  for a in range(2):
    if stride[a] < 1 or dilation[a] < 1 or padding[a] < 0:
      raise ConfigError(f"stride and dilation must be >= 1 and padding >= 0, got "
                        f"stride={stride}, dilation={dilation}, padding={padding}.")
    if not 0 <= output_padding[a] < max(stride[a], dilation[a]):
      raise ConfigError(f"output_padding {output_padding} must be smaller than stride "
                        f"or dilation (PyTorch's rule).")
    if conv_transpose_output_size(x.shape[1 + a], kernel.shape[a], stride[a], padding[a],
                                  output_padding[a], dilation[a]) < 1:
      raise ConfigError(f"padding {padding} leaves an empty output for input {x.shape}.")
  if impl == "auto":
    impl = "xla" if max(dilation) > 1 else "subpixel"
  if impl == "subpixel":
    if max(dilation) > 1:
      raise ConfigError("impl='subpixel' does not support dilation; use impl='xla'.")
    return _subpixel(x, kernel, stride, padding, output_padding)
  if impl == "xla":
    return _xla(x, kernel, stride, padding, output_padding, dilation)
  raise ConfigError(f"impl must be 'auto', 'subpixel' or 'xla', got {impl!r}.")
