"""Bilinear resizing of a region whose size is only known at run time.

Evaluation meets images of many sizes. To compile once per *canvas* (a fixed
padded shape) instead of once per image size, an image lives in the top-left
`valid` corner of a canvas, and resizing maps the valid region of one canvas
onto the valid region of another. The sizes of the regions are traced
values; the canvases are static. Each axis is a dense [out, in]
interpolation matrix built from the traced sizes with PyTorch's
`F.interpolate(mode="bilinear", align_corners=False)` arithmetic (no
antialiasing), so when the regions fill their canvases the result equals
`segjax.ops.resize`. Rows outside the output region are zero.
"""
import jax
import jax.numpy as jnp


def linear_matrix(out_len: int, in_len: int, out_valid, in_valid) -> jax.Array:
  """[out_len, in_len] float32 weights: row i interpolates output pixel i.

  Args:
    out_len, in_len: static canvas lengths.
    out_valid, in_valid: traced int scalars, the region lengths (>= 1,
      <= the canvas lengths).
  """
  out_valid = jnp.asarray(out_valid, jnp.float32)
  in_valid = jnp.asarray(in_valid, jnp.float32)
  dst = jnp.arange(out_len, dtype=jnp.float32)
  src = jnp.maximum((dst + 0.5) * (in_valid / out_valid) - 0.5, 0.0)
  i0 = jnp.minimum(jnp.floor(src), in_valid - 1)
  lam = jnp.clip(src - i0, 0.0, 1.0)
  i1 = jnp.minimum(i0 + 1, in_valid - 1)
  k = jnp.arange(in_len, dtype=jnp.float32)[None, :]
  weights = ((k == i0[:, None]) * (1.0 - lam)[:, None]
             + (k == i1[:, None]) * lam[:, None])
  return jnp.where((dst < out_valid)[:, None], weights, 0.0)


def resize_region(x: jax.Array, out_shape, in_valid, out_valid) -> jax.Array:
  """Resizes the valid region of `x` onto the valid region of a new canvas.

  Args:
    x: [N, H, W, C] canvas; only x[:, :in_valid[0], :in_valid[1]] is read.
    out_shape: static (H', W') of the output canvas.
    in_valid, out_valid: (h, w) traced int pairs, the region sizes.

  Returns:
    [N, H', W', C] float32, zero outside the output region.
  """
  mh = linear_matrix(out_shape[0], x.shape[1], out_valid[0], in_valid[0])
  mw = linear_matrix(out_shape[1], x.shape[2], out_valid[1], in_valid[1])
  x = x.astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST  # exact weights, not bfloat16 passes
  x = jnp.einsum("ih,nhwc->niwc", mh, x, precision=hi)
  return jnp.einsum("jw,niwc->nijc", mw, x, precision=hi)


def flip_region(x: jax.Array, width) -> jax.Array:
  """Mirrors the first `width` columns of x [N, H, W, C]; the rest stay."""
  cols = jnp.arange(x.shape[2])
  return jnp.take(x, jnp.where(cols < width, width - 1 - cols, cols), axis=2)
