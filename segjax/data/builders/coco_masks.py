"""COCO-style segmentations (polygons or run-length encoding) -> binary masks.

Used for COCO's instance annotations and for PASCAL in Detail's
`trainval_merged.json` (PASCAL-Context), which shares COCO's mask format.
Decoding goes through pycocotools, the reference implementation, so masks
match COCO's own evaluation pixel for pixel.

A segmentation is one of
  * polygons: [[x1, y1, x2, y2, ...], ...] in pixels, one list per part;
  * uncompressed RLE: {"size": [H, W], "counts": [n0, n1, ...]}, run lengths
    of alternating 0s and 1s over the mask in column-major order (crowd
    regions in COCO's json);
  * compressed RLE: {"size": [H, W], "counts": "<string>"}, the same runs in
    pycocotools' compact string form.
"""
import numpy as np
from pycocotools import mask as mask_utils


def decode(segmentation, height: int, width: int) -> np.ndarray:
  """uint8 [height, width] mask, 1 inside the segmentation, else 0.

  Raises:
    ValueError: if the segmentation is malformed or of another image size.
  """
  if isinstance(segmentation, list):
    polygons = [p for p in segmentation if len(p) >= 6]  # >= 3 points.
    if not polygons:
      return np.zeros((height, width), np.uint8)
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
  elif isinstance(segmentation, dict) and "counts" in segmentation:
    size = [int(s) for s in segmentation.get("size", ())]
    if size != [height, width]:
      raise ValueError(f"RLE of size {size} for an image of size "
                       f"{[height, width]}")
    counts = segmentation["counts"]
    if isinstance(counts, list):
      rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
      if isinstance(counts, str):
        counts = counts.encode("ascii")
      rle = {"size": size, "counts": counts}
  else:
    raise ValueError(f"not a polygon list or RLE: {str(segmentation)[:80]}")
  return np.asarray(mask_utils.decode(rle), np.uint8)
