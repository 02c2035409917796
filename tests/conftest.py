"""The test suite's layout and its shared fixtures.

The tests mirror the package: each module sits in the folder of the part of ``psa_dist`` whose code
it mainly checks (the subject its docstring names): ``core/``, ``util/``, ``nets/``, ``data/``,
``cluster/``, ``stages/`` and ``bench/`` for ``psa_dist/<part>/``; ``pipeline/`` for the top-level
modules (``config.py``, ``pipeline.py``, ``submit.py``) and the runs end to end through them (the
tiny pipeline, the SLURM chain, the rehearsals); ``project/`` for checks of the repository as a
whole rather than of one part (the import layers, the Dockerfiles, security across parts). The CLI
has no folder of its own: a command is tested with the part it runs. A GPU module
(``test_gpu_*.py``, marked ``gpu``) sits beside the CPU tests of the part it checks and shares
``tests/gpu_common.py``; ``launch/gpu_check.sh`` finds them as ``tests/*/test_gpu_*.py``. ``tests``
and each folder are packages, so that modules import as ``tests.<part>.test_<name>`` (basenames
may repeat across folders) and code that is not a fixture is imported from ``tests.gpu_common``.
A fixture that more than one module uses is defined here, once.
"""
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
