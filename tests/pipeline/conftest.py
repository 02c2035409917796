"""The real SLURM cluster the SLURM tests share (``launch/slurm_up.sh``: munged, MariaDB +
slurmdbd, slurmctld and two slurmd, n1 and n2, on this machine; stopped by recorded PIDs), once
per session, and the tiny config and dataset their jobs run."""
import os
import random
import subprocess
import tempfile
from pathlib import Path

import pytest

from psa_dist.config import SynthConfig
from psa_dist.data.synth import write_synth

REPO = Path(__file__).resolve().parents[2]

# the tiny config (``tiny_config``)
TINY = dict(name="slurmtest", device="cpu", shard_size=6, num_train=48, num_val=4,
            trainers={"train_cls": dict(epochs=6, log_every=2, checkpoint_every=2, lr=0.02,
                                        launcher="slurm", partition="debug", gpus_per_node=0,
                                        tasks_per_node=2, cpus_per_task=1, time_min=10)},
            model={"freeze_bn": True}, ray={"enabled": False})


@pytest.fixture(scope="session")
def _slurm_cluster():
    """The cluster, started once for the SLURM modules (test_slurm, test_slurm_chain) and stopped
    at the end of the session: a second start in one process would read the CPUs the first
    module's environment left (``nproc`` honours OMP_NUM_THREADS) and register 1-CPU nodes."""
    # not under pytest's 0700 temp root: munged needs every directory above its socket executable
    base = Path(tempfile.mkdtemp(prefix="psa-slurm-", dir="/tmp"))
    env = {**os.environ, "SLURM_BASE": str(base), "NODES": "n1 n2",
           "SLURM_PORT_BASE": str(random.Random().randrange(20000, 30000, 20))}
    up = subprocess.run(["bash", str(REPO / "launch" / "slurm_up.sh")], env=env, text=True,
                        capture_output=True)
    assert up.returncode == 0, f"slurm_up.sh failed:\n{up.stdout}\n{up.stderr}"
    yield base
    subprocess.run(["bash", str(REPO / "launch" / "slurm_down.sh")], env={**env, "PURGE": "1"},
                   capture_output=True)


@pytest.fixture(scope="module")
def slurm(_slurm_cluster):
    """The cluster, with this module's process pointed at it (restored after the module: the
    modules after it run as before)."""
    base = _slurm_cluster
    keys = ("SLURM_CONF", "PSA_MASTER_ADDR", "OMP_NUM_THREADS")
    saved = {k: os.environ.get(k) for k in keys}
    # the simulated nodes' names do not resolve: rendezvous on this host
    os.environ.update(SLURM_CONF=str(base / "slurm.conf"), PSA_MASTER_ADDR="127.0.0.1",
                      OMP_NUM_THREADS="1")
    yield base
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def cfg_path(tmp_path_factory, tiny_config):
    d = tmp_path_factory.mktemp("slurmcfg")
    write_synth(SynthConfig(image_size=48, num_train=48, num_val=4), d / "data", shard_size=6,
                workers=1, progress=False)
    return tiny_config(d / "cfg.yaml", d / "data", **TINY)
