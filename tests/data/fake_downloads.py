"""Helpers for the builder tests: tiny files in the real datasets' formats,
and building a tfds dataset from a fake manual directory; and whole fake
downloads in the real layouts for the end-to-end runs (`*_download`)."""
import dataclasses
import io
import json
import os
import zipfile

import numpy as np
import scipy.io
import scipy.sparse
import tensorflow_datasets as tfds
from PIL import Image
from pycocotools import mask as mask_utils

from segjax import viz


def solid(h, w, colour) -> np.ndarray:
  """uint8 [h, w, 3] of one colour (survives JPEG almost exactly)."""
  return np.broadcast_to(np.asarray(colour, np.uint8), (h, w, 3)).copy()


def _save(image: Image.Image, path, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path, **kwargs)


def write_image(path, array) -> None:
  """uint8 [H, W, 3] (RGB) or [H, W] (grey) as JPEG or PNG, by suffix."""
  _save(Image.fromarray(np.asarray(array, np.uint8)), path,
        **({"quality": 95} if str(path).endswith(".jpg") else {}))


def image_bytes(array, fmt="PNG") -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(array, np.uint8)).save(buffer, format=fmt)
  return buffer.getvalue()


def write_palette_png(path, ids) -> None:
  """uint8 [H, W] ids as a palette ("P") PNG in VOC colours, as VOC's
  SegmentationClass files are stored."""
  ids = np.ascontiguousarray(ids, np.uint8)
  image = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.tobytes())
  image.putpalette(viz.palette(256).ravel().tolist())
  _save(image, path)


def write_grey_png(path, ids) -> None:
  """uint8 [H, W] ids as a single-channel ("L") PNG."""
  _save(Image.fromarray(np.ascontiguousarray(ids, np.uint8)), path)


def write_text(path, lines) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("".join(f"{line}\n" for line in lines))


def build(builder_cls, data_dir, manual_dir, config=None, **kwargs):
  """Prepares `builder_cls` from `manual_dir` into `data_dir`."""
  if config is not None:
    kwargs["config"] = config
  builder = builder_cls(data_dir=str(data_dir), **kwargs)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual_dir)))
  return builder


def examples(builder, split) -> dict:
  """{file_name: example as numpy} of a prepared split."""
  ds = builder.as_dataset(split=split, shuffle_files=False)
  return {ex["file_name"].decode(): ex for ex in tfds.as_numpy(ds)}


def split_sizes(builder) -> dict:
  return {name: info.num_examples for name, info in builder.info.splits.items()}


# --- whole downloads, for the end-to-end runs --------------------------------
#
# Each `*_download(root)` writes a small download in its dataset's real layout
# under `root` (the manual dir) and returns a `Download`. Images are scenes:
# a background class with rectangles and ellipses of other classes, each class
# its own colour plus noise, so a few steps of training have something to
# learn. Their sizes are the real datasets' sizes scaled down (several sizes
# and both orientations where the real ones have them), because what the runs
# check is that images of different sizes flow through training, evaluation
# and prediction.


@dataclasses.dataclass
class Download:
  """manual_dir: what a user passes to load_builder(manual_dir=...).
  dataset: its config.dataset. images: a few of its image files.
  sizes: (height, width) of each image in `images`."""
  manual_dir: str
  dataset: str
  images: list
  sizes: list


def _colour(class_id):
  return np.random.default_rng(1000 + int(class_id)).integers(20, 236, 3)


def scene(h, w, background, objects, seed, void=None):
  """(rgb uint8 [h, w, 3], ids uint8 [h, w], object masks [bool [h, w]]).

  `background`: its class id; `objects`: class ids, drawn in order as
  rectangles and ellipses at random places (later ones on top); `void`: an
  id painted as a 1-pixel border around each object, as VOC does.
  """
  rng = np.random.default_rng(seed)
  ids = np.full((h, w), background, np.uint8)
  yy, xx = np.mgrid[:h, :w]
  masks = []
  for k, cls in enumerate(objects):
    oh, ow = (int(rng.integers(max(2, s // 4), max(3, s * 2 // 3))) for s in (h, w))
    y0, x0 = int(rng.integers(0, h - oh)), int(rng.integers(0, w - ow))
    if k % 2:
      cy, cx = y0 + oh / 2, x0 + ow / 2
      mask = ((yy - cy) / (oh / 2)) ** 2 + ((xx - cx) / (ow / 2)) ** 2 <= 1
    else:
      mask = (yy >= y0) & (yy < y0 + oh) & (xx >= x0) & (xx < x0 + ow)
    if void is not None:
      grown = np.zeros_like(mask)
      grown[max(y0 - 1, 0):y0 + oh + 1, max(x0 - 1, 0):x0 + ow + 1] = True
      ids[grown & ~mask] = void
    ids[mask] = cls
    masks.append(mask)
  palette = np.stack([_colour(i) for i in range(256)])
  rgb = palette[ids] + rng.normal(0, 12, (h, w, 3))
  return np.clip(rgb, 0, 255).astype(np.uint8), ids, masks


def _scaled(sizes, factor):
  return [(max(8, round(h / factor)), max(8, round(w / factor))) for h, w in sizes]


def _write_sbd_mat(path, segmentation):
  """SBD's cls/<id>.mat: struct GTcls with Segmentation, Boundaries (a
  20x1 cell of sparse edge maps) and CategoriesPresent."""
  h, w = segmentation.shape
  boundaries = np.empty((20, 1), object)
  for k in range(20):
    boundaries[k, 0] = scipy.sparse.csc_matrix((h, w))
  present = np.unique(segmentation[(segmentation > 0) & (segmentation < 255)])
  os.makedirs(os.path.dirname(path), exist_ok=True)
  scipy.io.savemat(path, {"GTcls": {
      "Segmentation": segmentation.astype(np.uint8),
      "Boundaries": boundaries,
      "CategoriesPresent": present.astype(np.uint8).reshape(-1, 1)}})


# VOC's three usual image sizes (h, w): 500x375, 375x500, 500x333.
VOC_SIZES = [(375, 500), (500, 375), (333, 500)]


def voc_download(root, factor=5, train=6, val=3, sbd=3) -> Download:
  """VOCdevkit/VOC2012 (JPEGImages, SegmentationClass palette PNGs with a
  void border, ImageSets/Segmentation lists) and SBD's
  benchmark_RELEASE/dataset (cls/*.mat, img/*.jpg, train.txt, val.txt), for
  "voc2012_segmentation/aug": train = VOC train + SBD-only images."""
  root = str(root)
  voc = os.path.join(root, "VOCdevkit", "VOC2012")
  sizes = _scaled(VOC_SIZES, factor)
  voc_ids = [f"2007_{k:06d}" for k in range(train + val)]
  sbd_ids = [f"2008_{k:06d}" for k in range(sbd)]
  images = {}
  for k, image_id in enumerate(voc_ids + sbd_ids):
    h, w = sizes[k % len(sizes)]
    rgb, ids, _ = scene(h, w, 0, [1 + (3 * k) % 20, 1 + (7 * k + 5) % 20], k,
                        void=255)
    if image_id in voc_ids:
      write_image(os.path.join(voc, "JPEGImages", f"{image_id}.jpg"), rgb)
      write_palette_png(os.path.join(voc, "SegmentationClass", f"{image_id}.png"), ids)
      images[image_id] = (h, w)
    else:  # SBD's own images and labels (its .mat files have no void).
      sbd_root = os.path.join(root, "benchmark_RELEASE", "dataset")
      write_image(os.path.join(sbd_root, "img", f"{image_id}.jpg"), rgb)
      _write_sbd_mat(os.path.join(sbd_root, "cls", f"{image_id}.mat"),
                     np.where(ids == 255, 0, ids))
  lists = os.path.join(voc, "ImageSets", "Segmentation")
  write_text(os.path.join(lists, "train.txt"), voc_ids[:train])
  write_text(os.path.join(lists, "val.txt"), voc_ids[train:])
  write_text(os.path.join(lists, "trainval.txt"), voc_ids)
  sbd_root = os.path.join(root, "benchmark_RELEASE", "dataset")
  write_text(os.path.join(sbd_root, "train.txt"), sbd_ids[:-1] + voc_ids[:2])
  write_text(os.path.join(sbd_root, "val.txt"), sbd_ids[-1:])
  shown = voc_ids[train:train + 2]
  return Download(root, "voc2012_segmentation/aug",
                  [os.path.join(voc, "JPEGImages", f"{i}.jpg") for i in shown],
                  [images[i] for i in shown])


def _rle(mask):
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def pascal_context_download(root, factor=5, train=6, val=3) -> Download:
  """VOCdevkit/VOC2010/JPEGImages and trainval_merged.json (PASCAL in Detail:
  one compressed-RLE segmentation per labelled region, 459-label ids).
  VOC 2010's images have VOC's sizes."""
  from segjax.data.builders import pascal_context as pc
  root = str(root)
  sizes = _scaled(VOC_SIZES, factor)
  labels = pc.CONTEXT59_IDS
  records, annotations, shown = [], [], []
  for k in range(train + val):
    stem = f"2008_{k:06d}"
    h, w = sizes[k % len(sizes)]
    # Ids above 255 do not fit the scene's uint8 map: draw indices, then map.
    picks = [(5 * k) % len(labels), (11 * k + 3) % len(labels), (17 * k + 7) % len(labels)]
    rgb, index, _ = scene(h, w, picks[0], picks[1:], 100 + k)
    path = os.path.join(root, "VOCdevkit", "VOC2010", "JPEGImages", f"{stem}.jpg")
    write_image(path, rgb)
    image_id = int(stem.replace("_", ""))
    phase = "train" if k < train else "val"
    records.append({"image_id": image_id, "file_name": f"{stem}.jpg", "height": h,
                    "width": w, "phase": phase, "date_captured": ""})
    for j, pick in enumerate(sorted(set(picks))):
      mask = index == pick
      if mask.any():
        annotations.append({
            "id": 100 * k + j, "image_id": image_id, "category_id": labels[pick],
            "segmentation": _rle(mask), "area": int(mask.sum()),
            "bbox": [0, 0, w, h], "iscrowd": 0, "parts": []})
    if phase == "val" and len(shown) < 2:
      shown.append((path, (h, w)))
  categories = [{"category_id": i + 1, "name": name, "supercategory": "object",
                 "onlysemantic": 0, "parts": []}
                for i, name in enumerate(pc.FULL_NAMES)]
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, pc.JSON_NAME), "w") as f:
    json.dump({"info": {}, "images": records, "annos_segmentation": annotations,
               "categories": categories, "parts": [], "annos_occlusion": [],
               "annos_boundary": [], "annos_joints": []}, f)
  return Download(root, "pascal_context/59", [p for p, _ in shown],
                  [s for _, s in shown])


# labelIds of a street: road, sidewalk, building, vegetation, sky, person,
# car, and 0 (unlabeled, ignored).
CITYSCAPES_IDS = (7, 8, 11, 21, 23, 24, 26, 0)


def cityscapes_download(root, factor=32, train=4, val=2, test=1) -> Download:
  """leftImg8bit/{train,val,test}/<city>/*_leftImg8bit.png and
  gtFine/.../*_gtFine_{labelIds,instanceIds,color}.png, *_polygons.json.
  Every Cityscapes image is 2048x1024 (2:1)."""
  root = str(root)
  h, w = round(1024 / factor), round(2048 / factor)
  shown = []
  seed = 0
  for folder, city, count in (("train", "aachen", train), ("val", "frankfurt", val),
                              ("test", "berlin", test)):
    for k in range(count):
      seed += 1
      stem = f"{city}_{k:06d}_000019"
      ids = list(CITYSCAPES_IDS)
      rgb, label, _ = scene(h, w, 7, [ids[(seed + j) % len(ids)] for j in range(1, 4)],
                            200 + seed)
      path = os.path.join(root, "leftImg8bit", folder, city, f"{stem}_leftImg8bit.png")
      write_image(path, rgb)
      gt = os.path.join(root, "gtFine", folder, city)
      label = label if folder != "test" else np.zeros_like(label)
      write_grey_png(os.path.join(gt, f"{stem}_gtFine_labelIds.png"), label)
      write_grey_png(os.path.join(gt, f"{stem}_gtFine_instanceIds.png"), label)
      write_image(os.path.join(gt, f"{stem}_gtFine_color.png"),
                  np.zeros((h, w, 3), np.uint8))
      with open(os.path.join(gt, f"{stem}_gtFine_polygons.json"), "w") as f:
        json.dump({"imgHeight": h, "imgWidth": w, "objects": []}, f)
      if folder == "val":
        shown.append((path, (h, w)))
  return Download(root, "cityscapes", [p for p, _ in shown], [s for _, s in shown])


# ADE20K images have a short side of about 512 in both orientations, e.g.
# 512x683, 683x512, 384x512 (h, w).
ADE_SIZES = [(512, 683), (683, 512), (384, 512)]


def ade20k_download(root, factor=8, train=6, val=3, zipped=True) -> Download:
  """ADEChallengeData2016/{images,annotations}/{training,validation}: JPEGs
  and grey PNGs of raw ids (0 "other", 1..150), as ADEChallengeData2016.zip
  (the download) or extracted. `images` are extracted copies of two
  validation JPEGs either way."""
  root = str(root)
  tree = os.path.join(root, "_tree") if zipped else root
  top = os.path.join(tree, "ADEChallengeData2016")
  sizes = _scaled(ADE_SIZES, factor)
  write_text(os.path.join(top, "objectInfo150.txt"),
             ["Idx\tRatio\tTrain\tVal\tName", "1\t0.1576\t11664\t1172\twall"])
  write_text(os.path.join(top, "sceneCategories.txt"), ["ADE_train_00000001 airport"])
  shown = []
  for k in range(train + val):
    folder, number = (("training", k + 1) if k < train else ("validation", k - train + 1))
    stem = f"ADE_{'train' if k < train else 'val'}_{number:08d}"
    h, w = sizes[k % len(sizes)]
    rgb, ids, _ = scene(h, w, 1 + k % 3, [0, 1 + (13 * k) % 150, 1 + (29 * k + 7) % 150],
                        300 + k)
    path = os.path.join(top, "images", folder, f"{stem}.jpg")
    write_image(path, rgb)
    write_grey_png(os.path.join(top, "annotations", folder, f"{stem}.png"), ids)
    if folder == "validation" and len(shown) < 2:
      shown.append((path, (h, w)))
  if zipped:
    from segjax.data.builders import ade20k
    with zipfile.ZipFile(os.path.join(root, ade20k.ARCHIVE), "w") as z:
      for dirpath, _, names in os.walk(top):
        for name in names:
          path = os.path.join(dirpath, name)
          z.write(path, os.path.relpath(path, tree))
  return Download(root, "ade20k", [p for p, _ in shown], [s for _, s in shown])


# COCO's usual image sizes (h, w): 480x640, 640x480, 427x640.
COCO_SIZES = [(480, 640), (640, 480), (427, 640)]
# COCO category ids drawn: person, car, dog, chair, cup, bus.
COCO_THINGS = (1, 3, 18, 62, 47, 6)
# stuffthingmaps values (0-based ids of the 182 space) of stuff backgrounds:
# grass (124), sky-other (157), wall-concrete (171), floor-wood (114).
COCO_STUFF = (123, 156, 170, 113)


def coco_download(root, factor=10, train=6, val=3) -> Download:
  """COCO 2017 as downloaded: train2017/ extracted, val2017.zip,
  annotations_trainval2017.zip (instances_{train,val}2017.json: polygon
  instances, one crowd RLE region) and stuffthingmaps_trainval2017/
  (COCO-Stuff's 0-based label maps, 255 unlabelled). Serves
  "coco_instances/instances" and "coco_instances/stuff"; `dataset` is the
  former. `images` are extracted copies of two validation JPEGs."""
  from segjax.data.builders import coco
  root = str(root)
  sizes = _scaled(COCO_SIZES, factor)
  split_images = {"train2017": {}, "val2017": {}}
  jsons = {"train2017": ([], []), "val2017": ([], [])}
  shown = []
  for k in range(train + val):
    folder = "train2017" if k < train else "val2017"
    image_id = 1000 + k
    name = f"{image_id:012d}.jpg"
    h, w = sizes[k % len(sizes)]
    things = [COCO_THINGS[(k + j) % len(COCO_THINGS)] for j in range(2 + k % 2)]
    stuff = COCO_STUFF[k % len(COCO_STUFF)]
    # The scene's classes are stuffthingmaps values: COCO id - 1.
    rgb, ids, masks = scene(h, w, stuff, [t - 1 for t in things], 400 + k)
    if k == 1:
      ids[:2, :] = 255  # an unlabelled strip
    split_images[folder][name] = rgb
    records, annotations = jsons[folder]
    records.append({"id": image_id, "file_name": name, "height": h, "width": w,
                    "license": 1, "coco_url": "", "flickr_url": "",
                    "date_captured": ""})
    for j, (cat, mask) in enumerate(zip(things, masks)):
      visible = mask & (ids == cat - 1)
      if not visible.any():
        continue
      ys, xs = np.nonzero(visible)
      x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
      crowd = k == 2 and j == 0
      segmentation = (_uncompressed_rle(visible) if crowd else
                      [[float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]])
      annotations.append({
          "id": 100 * k + j + 1, "image_id": image_id, "category_id": cat,
          "iscrowd": int(crowd), "segmentation": segmentation,
          "area": float(visible.sum()),
          "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]})
    write_grey_png(os.path.join(root, "stuffthingmaps_trainval2017", folder,
                                name.replace(".jpg", ".png")), ids)
    if folder == "val2017" and len(shown) < 2:
      path = os.path.join(root, "val2017_extracted", name)
      write_image(path, rgb)
      shown.append((path, (h, w)))
  for name, rgb in split_images["train2017"].items():
    write_image(os.path.join(root, "train2017", name), rgb)
  with zipfile.ZipFile(os.path.join(root, "val2017.zip"), "w") as z:
    for name, rgb in split_images["val2017"].items():
      z.writestr(f"val2017/{name}", image_bytes(rgb, "JPEG"))
  categories = [{"id": i, "name": n, "supercategory": ""} for i, n in coco.CATEGORIES]
  with zipfile.ZipFile(os.path.join(root, coco.ANNOTATIONS_ARCHIVE), "w") as z:
    for folder, (records, annotations) in jsons.items():
      z.writestr(f"annotations/instances_{folder}.json", json.dumps(
          {"info": {}, "licenses": [], "images": records,
           "annotations": annotations, "categories": categories}))
  return Download(root, "coco_instances/instances", [p for p, _ in shown],
                  [s for _, s in shown])


def _uncompressed_rle(mask):
  """COCO json's crowd format: column-major run lengths, zeros first."""
  flat = mask.astype(np.uint8).ravel(order="F")
  changes = np.flatnonzero(np.diff(flat)) + 1
  runs = np.diff(np.concatenate([[0], changes, [flat.size]]))
  counts = runs.tolist() if flat[0] == 0 else [0] + runs.tolist()
  return {"size": list(mask.shape), "counts": counts}
