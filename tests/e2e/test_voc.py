"""configs/deeplab_v3_plus_voc.py:tiny end to end on a fake VOC 2012 + SBD
download (500x375, 375x500 and 500x333 images, scaled down): train_aug,
evaluation on whole images of their own sizes."""
import pytest

import e2e_runs

pytestmark = pytest.mark.slow(seconds=50)


def test_voc_tiny_run(tmp_path):
  result = e2e_runs.run("deeplab_v3_plus_voc.py", e2e_runs.fake_downloads.voc_download,
                        tmp_path)
  e2e_runs.check_semantic(result, num_classes=21)
