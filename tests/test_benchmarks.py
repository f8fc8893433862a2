"""The benchmark scripts' smoke modes, so that they cannot rot.

benchmarks/ is not a package: its scripts import `timing` (and each other)
as scripts do, from their own folder.
"""
import json
import os
import sys

import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))


def test_bench_input_smoke(tmp_path):
  """The semantic and the Mask R-CNN stream, from files in the real layouts."""
  import bench_input
  out = tmp_path / "input.json"
  bench_input.main(["--smoke", "--families", "voc,coco", "--read", "decode",
                    "--data-dir", str(tmp_path / "data"), "--out", str(out)])
  rows = json.loads(out.read_text())["rows"]
  assert [r["family"] for r in rows] == ["voc", "coco"]
  assert all(r["images_per_sec"] > 0 for r in rows)


def test_accelerator_smoke(tmp_path):
  """The U-Net, a registry model and ROI Align at toy sizes, segjax and PyTorch."""
  pytest.importorskip("torch")
  import accelerator
  out = tmp_path / "accelerator.json"
  result = accelerator.main(["--smoke", "--dtypes", "float32", "--out", str(out)])
  rows = {r["row"].split(":")[0]: r for r in result["rows"]}
  assert set(rows) == {"unet", "fcn_resnet50", "roi_align fwd+bwd"}
  for row in rows.values():
    assert row.get("step_s", 0) > 0, row
  assert rows["unet"]["torch_step_s"] > 0 and rows["unet"]["gflops"] > 0
  assert rows["roi_align fwd+bwd"]["torch_ratio"] > 0
  assert "| unet | float32 |" in (tmp_path / "accelerator.md").read_text()


def test_bench_coco_eval_smoke(tmp_path):
  """The host side of detector evaluation: every detection reaches pycocotools."""
  import bench_coco_eval
  out = tmp_path / "coco_eval.json"
  row = bench_coco_eval.main(["--images", "3", "--detections", "5", "--json", str(out)])
  assert row["num_detections"] == 15 and 0 <= row["mask_ap"] <= 1
  assert row["peak_rss_gb"] >= row["peak_rss_gb_at_start"] > 0
  assert json.loads(out.read_text())["rows"][0]["images"] == 3


def test_bench_overheads_smoke(tmp_path):
  """segjax's step against a plain SGD closure (the U-Net: the detector's
  three compiles of the same code would take a minute here)."""
  import bench_overheads
  rows = bench_overheads.main(["--smoke", "--models", "unet", "--steps", "1",
                               "--rounds", "1", "--json", str(tmp_path / "o.json")])
  assert [r["model"] for r in rows] == ["unet"]
  assert all(r["plain_s"] > 0 and r["segjax_s"] > 0 for r in rows)
