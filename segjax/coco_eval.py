"""COCO-style instance evaluation (box and mask AP) on top of pycocotools.

`CocoEvaluator` collects ground truth and detections per image, at the image's
ORIGINAL resolution, as plain Python data (boxes as lists, masks as compressed
RLE with `str` counts), so each host can evaluate its share of the images and
the states can be pickled, gathered and merged. `summary` builds the COCO
ground-truth and result objects in memory and runs pycocotools' COCOeval for
"bbox" and "segm", as torchvision's and detectron2's COCO evaluators do
(`iou_types=("bbox",)` scores boxes alone, for detectors without masks):

  * ground truth: category ids are the class ids 1..K, `area` is the mask's
    pixel area (COCO's annotations give the segmentation area, and COCOeval
    uses it for the small / medium / large ranges of both iou types), crowd
    regions are `iscrowd` = 1 (detections matching them are neither true nor
    false positives, and missing them is no miss);
  * detections go through `COCO.loadRes`, once with boxes only (area = box
    area) and once with masks only (area = mask area, box from the mask);
  * boxes are converted from (x1, y1, x2, y2) to (x, y, w, h) with
    w = x2 - x1, h = y2 - y1 (no +1), as torchvision's `convert_to_xywh`.

Nothing here uses jax: the model's outputs are pasted into full-size binary
masks on the host before they are added.
"""
import contextlib
import copy
import io
from typing import Any, Optional, Sequence

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

Array = Any

# Names of COCOeval.stats, in its order.
_STAT_NAMES = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large",
               "ar1", "ar10", "ar100", "ar_small", "ar_medium", "ar_large")
# COCOeval iouType -> summary prefix, in summary order.
_PREFIXES = {"bbox": "box", "segm": "mask"}
IOU_TYPES = tuple(_PREFIXES)


def _encode_masks(masks: np.ndarray) -> list:
  """[N, H, W] binary masks -> N compressed RLE dicts with `str` counts.

  pycocotools returns `bytes` counts; `str` pickles and JSON-encodes alike,
  and every pycocotools function that reads an RLE accepts it.
  """
  if masks.shape[0] == 0:
    return []
  # encode wants [H, W, N] uint8 in Fortran order. Its run-length coder
  # compares each value with the previous one, so values must be exactly 0/1
  # (a 255 would flip the run twice): binarise first.
  fortran = np.asfortranarray((masks != 0).transpose(1, 2, 0).astype(np.uint8))
  rles = mask_util.encode(fortran)
  return [{"size": [int(s) for s in r["size"]],
           "counts": r["counts"].decode("ascii")} for r in rles]


def _xyxy_to_xywh(boxes: np.ndarray) -> list:
  """[N, 4] (x1, y1, x2, y2) -> N lists [x, y, w, h] of Python floats."""
  return [[float(x1), float(y1), float(x2 - x1), float(y2 - y1)]
          for x1, y1, x2, y2 in boxes]


class CocoEvaluator:
  """Accumulates ground truth and detections of images at their ORIGINAL
  resolution, then runs pycocotools COCOeval for "bbox" and "segm" (or
  those of `iou_types`).

  Usage: `add_ground_truth` once per evaluated image (also images without
  objects: their detections are all false positives), `add_detections` for
  the model's outputs on it (any number of calls, in any order), then
  `summary()`. With several hosts, gather the other hosts' `state()` and
  `merge` them into one evaluator before `summary()`.
  """

  def __init__(self, num_classes: int,
               class_names: Optional[Sequence[str]] = None,
               iou_types: Sequence[str] = IOU_TYPES):
    """
    Args:
      num_classes: number of classes counting background, as torchvision's
        Mask R-CNN: the object classes are 1..K with K = num_classes - 1.
      class_names: optional names for the COCO categories, either K names
        (classes 1..K) or num_classes names whose first one is background.
      iou_types: what `summary` scores, some of "bbox" and "segm" (both by
        default). Without "segm", detections need no masks (a detector
        without a mask head, e.g. Faster R-CNN).
    """
    unknown = sorted(set(iou_types) - set(IOU_TYPES))
    if unknown or not iou_types:
      raise ValueError(f"iou_types must be some of {IOU_TYPES}, got {tuple(iou_types)}")
    self.iou_types = tuple(t for t in IOU_TYPES if t in iou_types)
    num_classes = int(num_classes)
    if num_classes < 2:
      raise ValueError(f"num_classes counts background and must be >= 2, "
                       f"got {num_classes}")
    self.num_classes = num_classes
    k = num_classes - 1
    if class_names is None:
      names = [f"class_{c}" for c in range(1, num_classes)]
    else:
      names = [str(n) for n in class_names]
      if len(names) == num_classes:
        names = names[1:]
      elif len(names) != k:
        raise ValueError(
            f"class_names has {len(names)} entries; expected {k} (classes "
            f"1..{k}) or {num_classes} (background first)")
    self.class_names = names
    self._images = []       # {"id", "height", "width"}
    self._image_ids = set()
    self._gt = []           # annotations without "id" (assigned in summary)
    self._dt = []           # {"image_id", "category_id", "bbox", "score",
                            #  "segmentation"}

  # --- Accumulation ----------------------------------------------------------

  def _check_classes(self, classes: np.ndarray, what: str) -> None:
    k = self.num_classes - 1
    if classes.size and (classes.min() < 1 or classes.max() > k):
      raise ValueError(f"{what} classes must lie in 1..{k} (0 is background), "
                       f"got values in [{classes.min()}, {classes.max()}]")

  def add_ground_truth(self, image_id: int, height: int, width: int,
                       boxes: Array, classes: Array, masks: Array,
                       crowd: Array) -> None:
    """Adds one image and its ground-truth objects (possibly none).

    Args:
      image_id: unique int id of the image (unique over all hosts).
      height, width: the image's original size, H and W.
      boxes: [G, 4] float (x1, y1, x2, y2), pixels.
      classes: [G] int in 1..K.
      masks: [G, H, W] uint8 / bool instance masks (nonzero = object).
      crowd: [G] bool, True for crowd regions (COCO's iscrowd); None means
        no crowd region.
    """
    image_id, height, width = int(image_id), int(height), int(width)
    if image_id in self._image_ids:
      raise ValueError(f"ground truth for image_id {image_id} was already "
                       "added; every image must be added exactly once")
    classes = np.asarray(classes).reshape(-1).astype(np.int64)
    g = classes.shape[0]
    boxes = _check_boxes(boxes, g, "ground-truth")
    masks = _check_masks(masks, g, "ground-truth", (height, width))
    crowd = (np.zeros((g,), bool) if crowd is None
             else np.asarray(crowd, bool).reshape(-1))
    if crowd.shape[0] != g:
      raise ValueError(f"crowd has {crowd.shape[0]} entries for {g} objects")
    self._check_classes(classes, "ground-truth")
    self._images.append({"id": image_id, "height": height, "width": width})
    self._image_ids.add(image_id)
    rles = _encode_masks(masks)
    # COCO's annotation "area" is the segmentation area, in pixels.
    areas = (masks != 0).sum(axis=(1, 2))
    for box, cls, rle, area, is_crowd in zip(
        _xyxy_to_xywh(boxes), classes, rles, areas, crowd):
      self._gt.append({"image_id": image_id, "category_id": int(cls),
                       "bbox": box, "area": float(area),
                       "iscrowd": int(is_crowd), "segmentation": rle})

  def add_detections(self, image_id: int, boxes: Array, scores: Array,
                     classes: Array, masks: Optional[Array] = None) -> None:
    """Adds detections on one image (more calls for one image append).

    Args:
      image_id: id of an image that is (or will be) added with
        `add_ground_truth`.
      boxes: [D, 4] float (x1, y1, x2, y2), pixels of the original image.
      scores: [D] float confidences; COCOeval keeps the 100 best per image
        and class.
      classes: [D] int in 1..K.
      masks: [D, H, W] bool (or 0/1 integer) masks, already pasted and
        thresholded at the image's original size; needed when "segm" is
        scored, unused otherwise (None).
    """
    image_id = int(image_id)
    scores = np.asarray(scores, np.float64).reshape(-1)
    d = scores.shape[0]
    boxes = _check_boxes(boxes, d, "detection")
    classes = np.asarray(classes).reshape(-1).astype(np.int64)
    if classes.shape[0] != d:
      raise ValueError(f"{classes.shape[0]} detection classes for {d} scores")
    self._check_classes(classes, "detection")
    rles = [None] * d
    if "segm" in self.iou_types:
      if masks is None:
        raise ValueError("detection masks are needed to score \"segm\"; pass "
                         "them, or make the evaluator with iou_types=(\"bbox\",)")
      # The image size is checked in summary(): the ground truth may come later.
      rles = _encode_masks(_check_masks(masks, d, "detection", None))
    for box, score, cls, rle in zip(_xyxy_to_xywh(boxes), scores, classes, rles):
      det = {"image_id": image_id, "category_id": int(cls), "bbox": box,
             "score": float(score)}
      if rle is not None:
        det["segmentation"] = rle
      self._dt.append(det)

  # --- Multi-host ------------------------------------------------------------

  def state(self) -> dict:
    """Everything accumulated, as plain Python lists / dicts / str (picklable
    and JSON-serialisable), for `merge` on another evaluator."""
    return {"num_classes": self.num_classes, "iou_types": list(self.iou_types),
            "images": copy.deepcopy(self._images),
            "ground_truth": copy.deepcopy(self._gt),
            "detections": copy.deepcopy(self._dt)}

  def merge(self, other_state: dict) -> None:
    """Adds another evaluator's `state()` (e.g. another host's images).

    Raises ValueError if the class counts or the iou types differ (the
    detections would lack masks, or carry unused ones) or an image was
    added on both sides (it would count twice).
    """
    if int(other_state["num_classes"]) != self.num_classes:
      raise ValueError(f"cannot merge a state with num_classes="
                       f"{other_state['num_classes']} into one with "
                       f"{self.num_classes}")
    if tuple(other_state["iou_types"]) != self.iou_types:
      raise ValueError(f"cannot merge a state with iou_types="
                       f"{tuple(other_state['iou_types'])} into one with "
                       f"{self.iou_types}")
    ids = [img["id"] for img in other_state["images"]]
    twice = sorted(self._image_ids.intersection(ids))
    if twice or len(set(ids)) != len(ids):
      raise ValueError(f"images added on both sides of the merge: "
                       f"{twice[:10] or 'duplicates within the merged state'}")
    self._images.extend(copy.deepcopy(other_state["images"]))
    self._image_ids.update(ids)
    self._gt.extend(copy.deepcopy(other_state["ground_truth"]))
    self._dt.extend(copy.deepcopy(other_state["detections"]))

  # --- Evaluation ------------------------------------------------------------

  def _ground_truth_coco(self) -> COCO:
    """The in-memory COCO ground-truth object (no annotation file)."""
    sizes = {img["id"]: [img["height"], img["width"]] for img in self._images}
    for det in self._dt:
      if det["image_id"] not in sizes:
        raise ValueError(f"detections for image_id {det['image_id']}, which "
                         "has no add_ground_truth (images without objects "
                         "must be added too, with G = 0)")
      if "segmentation" in det and det["segmentation"]["size"] != sizes[det["image_id"]]:
        raise ValueError(
            f"detection mask of image_id {det['image_id']} is "
            f"{det['segmentation']['size']}, the image is "
            f"{sizes[det['image_id']]}: paste masks at the original size")
    coco = COCO()
    coco.dataset = {
        "images": [dict(img) for img in self._images],
        # Annotation ids start at 1: COCOeval stores the matched id in
        # dtMatches and takes 0 for "unmatched", so an id of 0 would turn a
        # true positive into a false positive.
        "annotations": [dict(ann, id=i + 1,
                             segmentation=dict(ann["segmentation"]))
                        for i, ann in enumerate(self._gt)],
        "categories": [{"id": c + 1, "name": name}
                       for c, name in enumerate(self.class_names)],
    }
    coco.createIndex()
    return coco

  def _results_coco(self, gt: COCO, iou_type: str) -> COCO:
    """The detections as a COCO result object for one iou type."""
    if not self._dt:
      # loadRes cannot take an empty list (it looks at anns[0]). An empty
      # result set over the same images and categories is what COCOeval
      # then evaluates: every class with ground truth gets precision and
      # recall 0 (AP 0), classes without ground truth stay undefined (NaN).
      res = COCO()
      res.dataset = {"images": [dict(img) for img in gt.dataset["images"]],
                     "categories": copy.deepcopy(gt.dataset["categories"]),
                     "annotations": []}
      res.createIndex()
      return res
    # Fresh dicts: loadRes writes id / area / iscrowd into them. As in
    # torchvision and detectron2, "bbox" results carry no mask and "segm"
    # results no box, so loadRes takes each area from the evaluated shape.
    if iou_type == "bbox":
      anns = [{"image_id": d["image_id"], "category_id": d["category_id"],
               "bbox": list(d["bbox"]), "score": d["score"]}
              for d in self._dt]
    else:
      anns = [{"image_id": d["image_id"], "category_id": d["category_id"],
               "segmentation": dict(d["segmentation"]), "score": d["score"]}
              for d in self._dt]
    return gt.loadRes(anns)

  def summary(self, verbose: bool = False) -> dict:
    """Runs COCOeval for boxes and masks (the evaluator's `iou_types`).

    Args:
      verbose: let pycocotools print its progress and summary tables
        (silenced by default).

    Returns:
      A dict (JSON-ready), for prefix "box" ("bbox") and "mask" ("segm"),
      those of `iou_types`:
        f"{prefix}_ap", _ap50, _ap75, _ap_small, _ap_medium, _ap_large,
        _ar1, _ar10, _ar100, _ar_small, _ar_medium, _ar_large: the 12
          COCOeval.stats as floats, NaN where undefined (pycocotools' -1:
          no non-crowd ground truth in that class / area range);
        f"{prefix}_per_class_ap": K floats, AP@[.5:.95] of classes 1..K over
          all areas at 100 detections (mean of eval["precision"], as
          detectron2), NaN for classes without ground truth;
      plus "num_images" and "num_detections" (ints).
    """
    out = {"num_images": len(self._images), "num_detections": len(self._dt)}
    k = self.num_classes - 1
    if not self._images:
      # COCOeval has nothing to evaluate; every metric is undefined.
      for prefix in (_PREFIXES[t] for t in self.iou_types):
        out.update({f"{prefix}_{n}": float("nan") for n in _STAT_NAMES})
        out[f"{prefix}_per_class_ap"] = [float("nan")] * k
      return out
    quiet = (contextlib.nullcontext() if verbose
             else contextlib.redirect_stdout(io.StringIO()))
    with quiet:
      gt = self._ground_truth_coco()
      for iou_type in self.iou_types:
        prefix = _PREFIXES[iou_type]
        ev = COCOeval(gt, self._results_coco(gt, iou_type), iouType=iou_type)
        # Every added image counts, also those without ground truth (their
        # detections are false positives) or without detections.
        ev.params.imgIds = sorted(img["id"] for img in self._images)
        ev.params.catIds = list(range(1, k + 1))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        for name, value in zip(_STAT_NAMES, ev.stats):
          out[f"{prefix}_{name}"] = _undefined_to_nan(value)
        # precision: [iou thresholds, recall points, classes, areas, maxDets];
        # area 0 is "all", maxDets -1 is 100. A class without ground truth
        # keeps pycocotools' -1 everywhere.
        precision = ev.eval["precision"][:, :, :, 0, -1]
        per_class = []
        for c in range(k):
          p = precision[:, :, c]
          p = p[p > -1]
          per_class.append(float(p.mean()) if p.size else float("nan"))
        out[f"{prefix}_per_class_ap"] = per_class
    return out


def _undefined_to_nan(value: float) -> float:
  """pycocotools writes -1 for an undefined mean; report NaN instead."""
  value = float(value)
  return float("nan") if value == -1 else value


def _check_boxes(boxes: Array, n: int, what: str) -> np.ndarray:
  """Returns boxes as [n, 4] float64, accepting any empty array for n = 0."""
  boxes = np.asarray(boxes, np.float64)
  if boxes.size == 0 and n == 0:
    return np.zeros((0, 4), np.float64)
  if boxes.shape != (n, 4):
    raise ValueError(f"{what} boxes must be [{n}, 4] (x1, y1, x2, y2), got "
                     f"{boxes.shape}")
  return boxes


def _check_masks(masks: Array, n: int, what: str,
                 size: Optional[tuple]) -> np.ndarray:
  """Returns masks as an [n, H, W] array, checking the size when given."""
  masks = np.asarray(masks)
  if masks.size == 0 and n == 0:
    return np.zeros((0,) + (size or (0, 0)), np.uint8)
  if masks.dtype.kind not in "biu":
    # A soft mask (probabilities) is almost certainly not thresholded yet.
    raise ValueError(f"{what} masks must be bool or integer 0/1, got dtype "
                     f"{masks.dtype}; threshold them first (e.g. probs > 0.5)")
  if masks.ndim != 3 or masks.shape[0] != n:
    raise ValueError(f"{what} masks must be [{n}, H, W], got {masks.shape}")
  if size is not None and masks.shape[1:] != tuple(size):
    raise ValueError(f"{what} masks are {masks.shape[1:]}, the image is "
                     f"{tuple(size)}: give masks at the original resolution")
  return masks
