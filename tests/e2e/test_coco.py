"""COCO end to end on one fake COCO 2017 download (several image sizes, both
orientations; polygons, a crowd RLE, COCO-Stuff maps):
configs/mask_rcnn_r50_fpn_coco.py:tiny on "coco_instances" (COCO box and
mask AP, a canvas per orientation, one compilation per canvas) and
configs/deeplab_v3_plus_coco_stuff.py:tiny on "coco_instances/stuff"
(mIoU)."""
import collections
import functools
import os

import numpy as np
import pytest
from PIL import Image

import e2e_runs

pytestmark = pytest.mark.slow(seconds=120)


def _traced_shapes(monkeypatch, module, name):
  """Wraps module.name (a step function) to record its batch's image shape
  at every trace: jit traces once per compilation."""
  shapes, step = [], getattr(module, name)

  def traced(state, batch, *args, **kwargs):
    shapes.append(tuple(batch["image"].shape))
    return step(state, batch, *args, **kwargs)
  monkeypatch.setattr(module, name, traced)
  return shapes


def test_coco_instances_tiny_run(tmp_path, monkeypatch):
  from segjax.tasks import instance
  from segjax.train import steps
  trains = _traced_shapes(monkeypatch, steps, "train_step")
  detects = _traced_shapes(monkeypatch, instance, "detect_step")
  # 8 training images, 5 landscape and 3 portrait: seed 0 deals the 4th
  # step portrait, so the 4 steps of batch 8 cross both canvases. The 2
  # validation images are landscape (a portrait one would cost each
  # evaluation a compilation; the evaluation's canvases are tested in
  # tests/train/test_detection.py and tests/data/test_instances.py).
  download = functools.partial(e2e_runs.fake_downloads.coco_download, train=8, val=2)
  result = e2e_runs.run("mask_rcnn_r50_fpn_coco.py", download, tmp_path)
  # One compilation of the train step per canvas; the detector's once in
  # each evaluation (training's, segjax eval's).
  landscape, portrait = (8, 32, 64, 3), (8, 64, 32, 3)
  assert sorted(trains) == [landscape, portrait]
  assert collections.Counter(detects) == {landscape: 2}
  evals = e2e_runs.check_training(result)
  assert [r["step"] for r in evals] == [4, 4]  # training's, then segjax eval's
  for row in evals:
    assert e2e_runs.finite(row["mask_ap"], row["box_ap"], row["mask_ap50"]), row
  assert f"validation at step 4: mask AP {evals[-1]['mask_ap']:.4f}" in result.eval_out
  for path, (h, w) in zip(result.download.images, result.download.sizes):
    stem = os.path.join(result.output, os.path.splitext(os.path.basename(path))[0])
    assert np.asarray(Image.open(f"{stem}_instances.png")).shape == (h, w, 3)
    assert np.asarray(Image.open(f"{stem}_instance_ids.png")).shape == (h, w)


def test_coco_stuff_tiny_run(tmp_path):
  result = e2e_runs.run("deeplab_v3_plus_coco_stuff.py",
                        e2e_runs.fake_downloads.coco_download, tmp_path,
                        dataset="coco_instances/stuff")
  e2e_runs.check_semantic(result, num_classes=171)
