import os
import tempfile

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "2")
# A Ray temp dir of this test session's own: a stale /tmp/ray from another run cannot interfere.
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="psa-ray-", dir="/tmp"))


@pytest.fixture(autouse=True)
def _no_ray_left_running():
    """Tests that start Ray through the pipeline leave no instance behind for the next test."""
    yield
    import sys
    if "ray" in sys.modules:
        import ray
        if ray.is_initialized():
            ray.shutdown()
