"""configs/segformer_b0_ade20k.py:tiny end to end on a fake
ADEChallengeData2016.zip (portrait and landscape images of several sizes):
evaluation on whole images of their own sizes."""
import pytest

import e2e_runs

pytestmark = pytest.mark.slow(seconds=110)


def test_ade20k_tiny_run(tmp_path):
  result = e2e_runs.run("segformer_b0_ade20k.py", e2e_runs.fake_downloads.ade20k_download,
                        tmp_path)
  e2e_runs.check_semantic(result, num_classes=150)
