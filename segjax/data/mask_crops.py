"""Instance masks as M x M crops around their boxes: Mask R-CNN's targets
without image-sized masks.

A training step of Mask R-CNN needs each sampled roi's 28 x 28 (C4: 14 x 14)
target, ROI-aligned from its instance's mask (torchvision's
project_masks_on_boxes). Image-sized masks would cost G * Hc * Wc bytes an
image (100 * 1344^2 = 180 MB at the COCO defaults, 2.9 GB a batch of 16),
made by the input pipeline (segjax.data.instances) and copied to the
device every step for a few thousand target pixels. So, as TF Model Garden's Mask R-CNN does, each mask leaves as an
M x M crop around its box (`crop_masks`: from the mask as stored, before
resizing; bilinear, 2 x 2 samples a crop pixel; 0..255), with the box it
spans, and the model aligns the targets from the crop through that box
(targets.compact_mask_targets): G * M^2 bytes an image, 1.25 MB; with the
boxes 20.1 MB a batch of 16 instead of 2.89 GB, 144 times less. Scaling
the image scales the crop box only; flipping mirrors the crop with it.
The crop box is the instance's box grown by CROP_MARGIN = 1 pixel a side,
so that it holds all of the mask as torchvision's roi_align reads it
(bilinear, so up to half a pixel past the mask's edge).

M = 112 = 4 x 28: a positive roi (IoU >= 0.5 with its box, so 1/2 to 2
times the box a side) spans 2 to 8 crop pixels a target bin, and the crop
resolves what the targets' adaptive sampling sees. Mean |difference| to
torchvision's targets from the image-sized masks (28 x 28 targets of rois
jittered about the boxes at IoU >= 0.5, 12 segjax_shapes scenes a row):

  M                                     28      56      112     224
  objects 20-60 px (128^2 scenes)      .0176   .0067   .0037   .0031
  the same, images scaled by 1.6       .0219   .0130   .0113   .0110
  objects 80-240 px (512^2 scenes)     .0199   .0064   .0018   .0007

Small objects are at the floor by 112; large ones still gain at 224, for
4 times the bytes. The floor of the scaled row is torchvision's: its masks
are resized with nearest neighbour, the crops come from the stored mask.
Against targets from the stored mask itself, torchvision's differ there by
.0099 and the crops' by .0053 (objects of 64^2 scenes scaled by 1.5: .026
and .0052). C4's 14 x 14 targets differ by .0093 and .0012 (rows 2, 3).
What else was measured at M = 112: 2 x 2 samples a crop pixel rather than
1 take the largest difference on large objects from .27 to .13 (the mean
stays); without the margin, row 1 is .0043 (largest difference .52
instead of .26); reading the crop at pixel centres instead of at
torchvision's half-pixel offset (compact_mask_targets) would make row 1
.030.
"""
import tensorflow as tf

Example = dict[str, tf.Tensor]
# Side M, samples per crop pixel and axis, pixels added to each side of the
# box; the module docstring says why.
MASK_CROP_SIZE = 112
CROP_SUPERSAMPLE = 2
CROP_MARGIN = 1.0


def crop_masks(ex: Example, size: int = MASK_CROP_SIZE,
               supersample: int = CROP_SUPERSAMPLE, margin: float = CROP_MARGIN
               ) -> Example:
  """Replaces the image-sized "masks" by M x M crops around their boxes.

  The mask is read as torchvision's roi_align reads it, bilinear between
  pixel values, but with pixel (r, c)'s value at its centre (c + 1/2,
  r + 1/2) and constant from the border pixels' centres to half a pixel
  past the image (where torchvision reads pixel k at x = k, and clamps to
  the border over [-1, 0] and [W - 1, W]). Each crop pixel averages
  supersample^2 samples of it: crop pixel j covers [x1 + j s, x1 + (j + 1)
  s), s = (x2 - x1) / M, of the crop box (x1, y1, x2, y2), the instance's
  box grown by `margin` pixels a side so that the half-pixel ramp around
  the mask's edge, and any extension past the image, are inside the crop.
  The crop is thus box-relative: scaling the image scales its box only,
  flipping the image mirrors the crop about its box's centre.

  Args:
    ex: "masks" uint8 [N, H, W] and "boxes" float32 [N, 4] (x1, y1, x2, y2)
      with positive area inside the image (`instances.select_instances`'
      rows).
    size: M, the crop's side.
    supersample: samples per crop pixel and axis (antialiasing where a
      box is larger than M pixels).
    margin: pixels added to each side of a box.

  Returns:
    ex without "masks", with "mask_crops" uint8 [N, M, M] (0..255 for
    0..1) and "mask_boxes" float32 [N, 4], the crop boxes.
  """
  masks = ex["masks"]
  boxes = tf.cast(ex["boxes"], tf.float32) + tf.constant([-1.0, -1.0, 1.0, 1.0]) * margin
  n = tf.shape(masks)[0]
  samples = size * supersample
  # One border pixel more on each side (tf.pad's SYMMETRIC mode does the
  # same 10x slower): samples up to half a pixel past the image then read
  # the border pixel, past that the zeros crop_and_resize puts outside.
  padded = masks[..., None]
  padded = tf.concat([padded[:, :1], padded, padded[:, -1:]], 1)
  padded = tf.concat([padded[:, :, :1], padded, padded[:, :, -1:]], 2)
  x1, y1, x2, y2 = tf.unstack(boxes, axis=-1)
  step_x, step_y = (x2 - x1) / samples, (y2 - y1) / samples
  # Samples from x1 + step / 2 to x2 - step / 2. Position c + 1/2 (pixel
  # c's centre) is index c + 1 of the padded mask, and crop_and_resize
  # reads index a * (L - 1) at the normalised coordinate a, L = W + 2.
  first = tf.stack([y1 + step_y / 2, x1 + step_x / 2], -1) + 0.5
  last = tf.stack([y2 - step_y / 2, x2 - step_x / 2], -1) + 0.5
  length = tf.cast(tf.shape(masks)[1:3], tf.float32) + 1.0
  norm = tf.concat([first / length, last / length], -1)
  dense = tf.image.crop_and_resize(padded, norm, tf.range(n), [samples, samples])
  if supersample > 1:
    dense = tf.nn.avg_pool2d(dense, supersample, supersample, "VALID")
  out = {k: v for k, v in ex.items() if k != "masks"}
  out["mask_crops"] = tf.ensure_shape(
      tf.cast(tf.round(dense[..., 0] * 255.0), tf.uint8), [None, size, size])
  out["mask_boxes"] = boxes
  return out
