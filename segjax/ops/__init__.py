"""Pure jax.numpy operators of the segmentation models (NHWC, jit/vmap/grad safe).

Each mirrors a PyTorch / torchvision op number for number, so ported models
and checkpoints give the same outputs.
"""
from segjax.ops.boxes import (BBOX_XFORM_CLIP, anchor_grid, batched_nms, box_area,
                              box_iou, cell_anchors, clip_boxes, decode_boxes,
                              encode_boxes, generate_anchors, nms)
from segjax.ops.crf import dense_crf
from segjax.ops.resize import (bed_of_nails, bilinear_kernel_init, resize,
                               upsample_bilinear_kernel_size)
from segjax.ops.roi import fpn_levels, multilevel_roi_align, roi_align, roi_pool
from segjax.ops.transposed import conv_transpose, conv_transpose_output_size
from segjax.ops.unpool import max_pool_with_argmax, max_unpool

__all__ = [
    "BBOX_XFORM_CLIP", "anchor_grid", "batched_nms", "bed_of_nails",
    "bilinear_kernel_init", "box_area", "box_iou", "cell_anchors", "clip_boxes",
    "conv_transpose", "conv_transpose_output_size", "decode_boxes", "dense_crf",
    "encode_boxes", "fpn_levels", "generate_anchors", "max_pool_with_argmax",
    "max_unpool", "multilevel_roi_align", "nms", "resize", "roi_align", "roi_pool",
    "upsample_bilinear_kernel_size",
]
