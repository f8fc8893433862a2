"""resize, bed_of_nails, bilinear_kernel_init, conv_transpose vs numpy loops and PyTorch."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.test_util import check_grads

from conftest import needs
from segjax.errors import ConfigError
from segjax.ops import (bed_of_nails, bilinear_kernel_init, conv_transpose,
                        conv_transpose_output_size, resize)

# Against PyTorch (no README figure: "Parity tests" names these comparisons
# without one). Measured max |ours - torch| on O(1) inputs: F.interpolate
# 1.8e-6, conv_transpose2d 3.8e-6 (outputs up to 17).
TORCH_RESIZE_ATOL = 1e-5
TORCH_CONV_TRANSPOSE_ATOL = 2e-5

SIZES = [(5, 7, 10, 14), (5, 7, 20, 28), (8, 8, 3, 5), (4, 6, 9, 13), (7, 5, 7, 11),
         (1, 3, 4, 4), (3, 3, 1, 1), (6, 6, 24, 24)]


def ref_bilinear(x, oh, ow, align_corners):
  """F.interpolate(mode="bilinear") from its definition, one pixel at a time."""
  n, h, w, c = x.shape

  def src(o, i_size, o_size):
    if align_corners:
      return o * (i_size - 1) / (o_size - 1) if o_size > 1 else 0.0
    return max((o + 0.5) * i_size / o_size - 0.5, 0.0)

  out = np.zeros((n, oh, ow, c))
  for i in range(oh):
    y = src(i, h, oh)
    y0 = min(int(np.floor(y)), h - 1)
    y1, ly = min(y0 + 1, h - 1), y - y0
    for j in range(ow):
      xx = src(j, w, ow)
      x0 = min(int(np.floor(xx)), w - 1)
      x1, lx = min(x0 + 1, w - 1), xx - x0
      out[:, i, j] = ((1 - ly) * ((1 - lx) * x[:, y0, x0] + lx * x[:, y0, x1])
                      + ly * ((1 - lx) * x[:, y1, x0] + lx * x[:, y1, x1]))
  return out


def ref_nearest(x, oh, ow):
  h, w = x.shape[1:3]
  rows = [min(int(np.floor(i * np.float32(h / oh))), h - 1) for i in range(oh)]
  cols = [min(int(np.floor(j * np.float32(w / ow))), w - 1) for j in range(ow)]
  return x[:, rows][:, :, cols]


@pytest.mark.parametrize("h,w,oh,ow", SIZES)
@pytest.mark.parametrize("align_corners", [False, True])
def test_bilinear_matches_definition_for_every_impl(h, w, oh, ow, align_corners):
  x = np.random.RandomState(0).randn(2, h, w, 3).astype(np.float32)
  want = ref_bilinear(x, oh, ow, align_corners)
  for impl in ("auto", "gather", "phase", "matmul"):
    got = jax.jit(lambda a: resize(a, (oh, ow), "bilinear", align_corners, impl=impl))(x)
    np.testing.assert_allclose(got, want, atol=2e-5, err_msg=impl)


@pytest.mark.parametrize("h,w,oh,ow", SIZES)
def test_nearest_matches_definition(h, w, oh, ow):
  x = np.random.RandomState(1).randn(2, h, w, 3).astype(np.float32)
  got = jax.jit(lambda a: resize(a, (oh, ow), "nearest"))(x)
  np.testing.assert_array_equal(got, ref_nearest(x, oh, ow))


def test_resize_matches_torch():
  torch = needs("torch")
  F = torch.nn.functional
  rng = np.random.RandomState(2)
  for h, w, oh, ow in SIZES + [(13, 17, 52, 68), (9, 9, 33, 65)]:
    x = rng.randn(2, h, w, 3).astype(np.float32)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    for ac in (False, True):
      want = F.interpolate(xt, size=(oh, ow), mode="bilinear", align_corners=ac)
      np.testing.assert_allclose(resize(x, (oh, ow), align_corners=ac),
                                 want.permute(0, 2, 3, 1).numpy(), atol=TORCH_RESIZE_ATOL)
    want = F.interpolate(xt, size=(oh, ow), mode="nearest").permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(resize(x, (oh, ow), "nearest"), want)


def test_resize_vmap_grad_and_errors():
  x = jnp.asarray(np.random.RandomState(3).randn(3, 1, 4, 5, 2), jnp.float32)
  batched = jax.vmap(lambda a: resize(a, (8, 10)))(x)
  np.testing.assert_allclose(batched[:, 0], resize(x[:, 0], (8, 10)), atol=1e-6)
  for ac in (False, True):
    check_grads(lambda a: resize(a, (7, 9), align_corners=ac), (x[0],), order=1,
                modes=["rev"], atol=1e-2, rtol=1e-2)
  with pytest.raises(ConfigError):
    resize(x[0], (4, 4), method="bicubic")
  with pytest.raises(ConfigError):
    resize(x[0], (0, 4))


def test_bed_of_nails():
  x = np.random.RandomState(4).randn(2, 3, 4, 5).astype(np.float32)
  y = np.asarray(jax.jit(lambda a: bed_of_nails(a, 3))(x))
  want = np.zeros((2, 9, 12, 5), np.float32)
  for i in range(3):
    for j in range(4):
      want[:, 3 * i, 3 * j] = x[:, i, j]
  np.testing.assert_array_equal(y, want)
  with pytest.raises(ConfigError):
    bed_of_nails(x, 0)


def ref_conv_transpose(x, k, s, p, op, d):
  """ConvTranspose2d from its definition: scatter every input times the kernel."""
  n, h, w, _ = x.shape
  kh, kw, _, cout = k.shape
  full = np.zeros((n, (h - 1) * s + d * (kh - 1) + 1 + op,
                   (w - 1) * s + d * (kw - 1) + 1 + op, cout))
  for i in range(h):
    for j in range(w):
      for a in range(kh):
        for b in range(kw):
          full[:, i * s + a * d, j * s + b * d] += x[:, i, j] @ k[a, b]
  oh = conv_transpose_output_size(h, kh, s, p, op, d)
  ow = conv_transpose_output_size(w, kw, s, p, op, d)
  return full[:, p:p + oh, p:p + ow]


CONVT = [(4, 2, 1, 0, 1), (3, 2, 1, 1, 1), (2, 2, 0, 0, 1), (2, 2, 0, 1, 1),
         (16, 8, 4, 0, 1), (5, 3, 2, 2, 1), (3, 1, 1, 0, 1), (3, 2, 0, 1, 2)]


@pytest.mark.parametrize("k,s,p,op,d", CONVT)
def test_conv_transpose_matches_definition(k, s, p, op, d):
  rng = np.random.RandomState(5)
  x = rng.randn(2, 4, 5, 3).astype(np.float32)
  kern = rng.randn(k, k, 3, 2).astype(np.float32)
  want = ref_conv_transpose(x, kern, s, p, op, d)
  for impl in (("xla", "subpixel") if d == 1 else ("xla",)):
    got = jax.jit(lambda a, b: conv_transpose(a, b, s, p, op, d, impl=impl))(x, kern)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, err_msg=impl)


def test_conv_transpose_matches_torch_and_grads():
  torch = needs("torch")
  rng = np.random.RandomState(6)
  for k, s, p, op, d in CONVT + [(64, 32, 16, 0, 1)]:
    x = rng.randn(1, 3, 4, 3).astype(np.float32)
    wt = rng.randn(3, 2, k, k).astype(np.float32)
    want = torch.nn.functional.conv_transpose2d(
        torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(wt), stride=s,
        padding=p, output_padding=op, dilation=d).permute(0, 2, 3, 1).numpy()
    got = conv_transpose(x, jnp.asarray(wt.transpose(2, 3, 0, 1)), s, p, op, d)
    np.testing.assert_allclose(got, want, atol=TORCH_CONV_TRANSPOSE_ATOL)


def test_conv_transpose_grads_and_errors():
  rng = np.random.RandomState(7)
  x = jnp.asarray(rng.randn(1, 3, 3, 2), jnp.float32)
  kern = jnp.asarray(rng.randn(4, 4, 2, 2), jnp.float32)
  check_grads(lambda a, b: conv_transpose(a, b, 2, 1), (x, kern), order=1,
              modes=["rev"], atol=1e-2, rtol=1e-2)
  with pytest.raises(ConfigError):
    conv_transpose(x, kern, 2, 1, output_padding=2)


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_bilinear_kernel_init_upsamples_bilinearly(factor):
  """FCN's initialised transposed conv equals align_corners=False bilinear away from borders."""
  k = 2 * factor - factor % 2
  kern = bilinear_kernel_init(None, (k, k, 3, 3))
  assert np.count_nonzero(np.asarray(kern)[:, :, 0, 1]) == 0
  x = np.random.RandomState(8).randn(1, 6, 6, 3).astype(np.float32)
  y = conv_transpose(x, kern, factor, padding=(k - factor) // 2)
  assert y.shape == (1, 6 * factor, 6 * factor, 3)
  want = resize(x, (6 * factor, 6 * factor))
  m = factor  # the conv zero-pads where resize replicates the edge
  np.testing.assert_allclose(y[:, m:-m, m:-m], want[:, m:-m, m:-m], atol=1e-5)
