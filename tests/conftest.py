"""The test suite's layout and its shared fixtures.

The tests mirror the package: each module sits in the folder of the part of ``psa_dist`` whose code
it mainly checks (the subject its docstring names): ``core/``, ``util/``, ``nets/``, ``data/``,
``cluster/``, ``engine/``, ``stages/`` and ``bench/`` for ``psa_dist/<part>/``; ``pipeline/`` for
the top-level modules (``config/``, ``pipeline.py``, ``submit.py``) and the runs end to end through them (the
tiny pipeline, the SLURM chain, the rehearsals); ``project/`` for checks of the repository as a
whole rather than of one part (the import layers, the Dockerfiles, security across parts). The CLI
has no folder of its own: a command is tested with the part it runs. A GPU module
(``test_gpu_*.py``, marked ``gpu``) sits beside the CPU tests of the part it checks and shares
``tests/gpu_common.py``; ``launch/gpu_check.sh`` finds them as ``tests/*/test_gpu_*.py``. ``tests``
and each folder are packages, so that modules import as ``tests.<part>.test_<name>`` (basenames
may repeat across folders) and shared code that is not a fixture is imported by that name
(``tests.gpu_common``, ``tests.core.test_random_walk``). A fixture that more than one module uses
is defined here, once: a free port, a tiny config, a trained tiny run, a local Ray instance and a
local Ray cluster. A module states only its tiny config's settings (``TINY``, or ``tiny(...)``
where its tests vary one).
"""
import contextlib
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
import yaml

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


@pytest.fixture
def own_ray_token():
    """For a test that submits a Ray cluster job: the token authentication it turns on in this
    process (``cluster.ray_job.ray_job_env``) is taken back after it, so that a later local Ray
    instance does not start under it."""
    keys = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")
    saved = {k: os.environ.pop(k, None) for k in keys}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# ----------------------------------------------------------------------------- a free port
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """``free_port()``: a TCP port free on 127.0.0.1 now (the system's pick), a new one each call:
    the rendezvous port of a process group that a test starts."""
    return _free_port


# ----------------------------------------------------------------------------- a tiny config
# a trainer section of a tiny config: one epoch of batches of 4, 48-pixel crops, no loader workers
TRAINER = {"epochs": 1, "batch_size": 4, "crop_size": 48, "resize_long": [40, 56], "num_workers": 0}


class _PlainDumper(yaml.SafeDumper):
    """YAML without anchors and aliases: a list shared by two sections is written out twice."""

    def ignore_aliases(self, data):
        return True


def _write_tiny_config(path: Path, root: Path, *, name: str, shard_size: int, num_train: int,
                       num_val: int, image_size: int = 48, trainers=(), **sections) -> Path:
    """A tiny config written to ``path`` as YAML: a synthetic dataset under ``root`` (``data.root``,
    made by the first stage that needs it) of ``num_train`` / ``num_val`` images of ``image_size``
    in shards of ``shard_size``, written by one process (``data.workers: 1``); each trainer section
    named in ``trainers`` as ``TRAINER`` (updated by its entry where ``trainers`` is a dict of
    them); every other section (``device``, ``cams``, ``model``, ``ray``, ``seg_full``...) as
    given. Nothing else: a key left out here takes the config's default."""
    cfg = {"name": name, "data": {"root": str(root), "shard_size": shard_size, "workers": 1},
           "synth": {"image_size": image_size, "num_train": num_train, "num_val": num_val}}
    if not isinstance(trainers, dict):
        trainers = dict.fromkeys(trainers, {})
    cfg.update({section: {**TRAINER, **over} for section, over in trainers.items()})
    cfg.update(sections)
    path.write_text(yaml.dump(cfg, Dumper=_PlainDumper, sort_keys=False, default_flow_style=None))
    return path


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(path, root, name=..., shard_size=..., num_train=..., num_val=..., ...)``:
    writes a tiny config (``_write_tiny_config``) and returns its path."""
    return _write_tiny_config


# ----------------------------------------------------------------------------- a trained run
@pytest.fixture(scope="session")
def trained_run():
    """``trained_run(base, stages, out="ref", overrides=(), **config)``: the tiny config
    ``config`` written to ``base/cfg.yaml`` (its dataset under ``base/data``) and ``stages`` run
    in this process into ``base/<out>``; returns the config's path and the config loaded with
    ``out_dir`` and ``overrides``. A module's fixture calls it once (module scope) and copies
    from ``base/<out>`` what each test starts from."""
    def train(base: Path, stages, out: str = "ref", overrides=(), **config):
        from psa_dist.config import load_config
        from psa_dist.pipeline import run_pipeline
        path = _write_tiny_config(base / "cfg.yaml", base / "data", **config)
        cfg = load_config(path, [f"out_dir={base / out}", *overrides])
        run_pipeline(cfg, stages=list(stages))
        return path, cfg
    return train


# ----------------------------------------------------------------------------- Ray
@contextlib.contextmanager
def _local_ray(num_cpus: int, num_gpus: int = 0):
    """A Ray instance of this process's own (its own temp dir, no dashboard, the workers' output
    not sent to the driver), shut down and its temp dir removed on leaving the block."""
    import ray
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, _temp_dir=tmp,
             log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _ray_cluster(workers: int, **head_args):
    """A local multi-node Ray cluster (``ray.cluster_utils.Cluster``): a head and ``workers``
    worker nodes (``cluster.worker_nodes``), one CPU each, up and registered; the head takes
    ``head_args`` too. The driver connects itself (``ray.init(address=cluster.address)``). On
    leaving the block the driver disconnects and the cluster is shut down."""
    import ray
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, shutdown_at_exit=True,
                      head_node_args={"num_cpus": 1, **head_args})
    for _ in range(workers):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="session")
def local_ray():
    """``with local_ray(num_cpus, num_gpus=0) as ray:`` a local Ray instance for the block."""
    return _local_ray


@pytest.fixture(scope="session")
def ray_cluster():
    """``with ray_cluster(workers, **head_args) as cluster:`` a local Ray cluster of 1 + workers
    nodes for the block."""
    return _ray_cluster
