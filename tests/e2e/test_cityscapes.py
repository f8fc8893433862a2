"""configs/deeplab_v3_cityscapes.py:tiny end to end on a fake Cityscapes
download (2:1 PNGs): evaluation by sliding windows at six scales with
flips, the paper's protocol."""
import pytest

import e2e_runs

pytestmark = pytest.mark.slow(seconds=70)


def test_cityscapes_tiny_run(tmp_path):
  result = e2e_runs.run("deeplab_v3_cityscapes.py",
                        e2e_runs.fake_downloads.cityscapes_download, tmp_path)
  e2e_runs.check_semantic(result, num_classes=19)
  protocol = result.config["eval"]
  assert protocol["mode"] == "slide" and protocol["flip"]
  assert protocol["scales"] == [0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
