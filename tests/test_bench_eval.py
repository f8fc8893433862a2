"""benchmarks/bench_eval.py runs (toy sizes) and gives every device an even
share of the split."""
import os
import sys

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import bench_eval  # noqa: E402


def test_smoke_spreads_images_evenly(tmp_path):
  (row,) = bench_eval.main(["--smoke", "--images", "13", "--devices", "8", "--width", "4",
                            "--depth", "2", "--json", str(tmp_path / "eval.json")])
  assert sum(row["images_per_device"]) == 13
  assert max(row["images_per_device"]) - min(row["images_per_device"]) <= 1
  assert row["compilations"] == 2  # two canvases: landscape and portrait
  assert (tmp_path / "eval.json").exists()
