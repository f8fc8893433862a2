"""configs/deeplab_v3_plus_pascal_context.py:tiny end to end on a fake
PASCAL-Context download (VOC 2010 images of several sizes and the Detail
json): evaluation by sliding windows."""
import pytest

import e2e_runs

pytestmark = pytest.mark.slow(seconds=65)


def test_pascal_context_tiny_run(tmp_path):
  result = e2e_runs.run("deeplab_v3_plus_pascal_context.py",
                        e2e_runs.fake_downloads.pascal_context_download, tmp_path)
  e2e_runs.check_semantic(result, num_classes=59)
  protocol = result.config["eval"]
  assert protocol["mode"] == "slide" and protocol["crop_size"] == [32, 32]
