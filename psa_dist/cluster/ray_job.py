"""Work on a Ray cluster started inside a submitit job (``ray.launcher: slurm | local``): the same
thing ``launch/ray_slurm.sbatch`` does, submitted from Python.

Every task of the job is one Ray node: task 0 starts the head and, once every node has joined,
calls the job's work with the cluster's address; the other tasks start Ray workers and wait until
task 0 marks the work finished. The cluster uses token authentication with a secret made by the
submitter and handed to the job in its environment. On preemption the job requeues itself; work
that skips what it finished (the label stages skip written shards) resumes where it was.
"""
from __future__ import annotations

import copy
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from .launch import RAY_LAUNCHERS, Job, check_launcher, follow_job, make_executor


def _ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


def ray_start_command(rc, is_head: bool, head: str, port: int, cpus: str, gpus: str,
                      tmp: str) -> list[str]:
    """``ray start`` for one node of the job. The head's dashboard is off unless ``ray.dashboard``,
    and listens on ``ray.dashboard_host`` (127.0.0.1 by default: reach it through an SSH tunnel)."""
    common = [f"--num-cpus={cpus}", f"--num-gpus={gpus}", "--block"]
    if not is_head:
        return [_ray_cli(), "start", f"--address={head}:{port}", *common]
    return [_ray_cli(), "start", "--head", f"--node-ip-address={head}", f"--port={port}",
            f"--include-dashboard={str(rc.dashboard).lower()}",
            f"--dashboard-host={rc.dashboard_host}", f"--temp-dir={tmp}", *common]


class RayCluster:
    """A job's work: a Ray cluster over its tasks, then ``work(address)`` on task 0 (picklable: the
    Ray section (job shape, dashboard), the work, and the folder where task 0 leaves its
    "finished" marker). Submitted as a :class:`~psa_dist.cluster.launch.Job`, which requeues it
    on preemption: the work skips what it finished, so it resumes where it was."""

    def __init__(self, ray_cfg, work: Callable[[str], dict], folder: Path, port: int,
                 name: str = "ray"):
        self.ray_cfg, self.work, self.folder, self.port = ray_cfg, work, Path(folder), port
        self.name = name

    def __call__(self) -> dict | None:
        import submitit
        env = submitit.JobEnvironment()
        head = os.environ.get("PSA_MASTER_ADDR") or socket.gethostbyname(env.hostnames[0])
        address = f"{head}:{self.port}"
        cpus = os.environ.get("SLURM_CPUS_PER_TASK") or str(self.ray_cfg.cpus_per_task)
        gpus = str(len([g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g]))
        tmp = f"/tmp/ray-psa-{env.job_id}"          # short: Ray's socket paths are length-limited
        os.environ.setdefault("RAY_TMPDIR", tmp)
        cmd = ray_start_command(self.ray_cfg, env.global_rank == 0, head, self.port, cpus, gpus, tmp)
        ray_proc = subprocess.Popen(cmd)
        # one marker per attempt: a requeued job (SLURM_RESTART_COUNT) must not find the marker
        # its preempted attempt left, or its worker nodes would leave at once
        done = self.folder / f"{env.job_id}.{os.environ.get('SLURM_RESTART_COUNT', '0')}.stage-finished"
        try:
            if env.global_rank != 0:
                while not done.exists():    # a worker node until the driver is finished
                    if ray_proc.poll() is not None:
                        raise RuntimeError(f"ray worker on {env.hostname} exited ({ray_proc.returncode})")
                    time.sleep(1)
                return None
            return self._drive(address, env.num_tasks, done)
        finally:
            ray_proc.terminate()            # `ray start --block` stops this node's Ray on SIGTERM
            ray_proc.wait(timeout=60)

    def _drive(self, address: str, nodes: int, done: Path) -> dict:
        import ray
        deadline = time.monotonic() + 300
        while True:
            try:
                ray.init(address=address, log_to_driver=False)
                break
            except Exception:   # noqa: BLE001 - the head is still starting
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)
        while sum(n["Alive"] for n in ray.nodes()) < nodes:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {sum(n['Alive'] for n in ray.nodes())} of {nodes} Ray "
                                   f"nodes joined {address} in 300 s")
            time.sleep(1)
        print(f"[{self.name}] Ray cluster of {nodes} node(s) at {address}: "
              f"{ray.cluster_resources()}", flush=True)
        try:
            return self.work(address)
        finally:
            ray.shutdown()
            done.touch()


class AtAddress:
    """Work for a :class:`RayCluster`: ``fn(cfg, *args)`` with a copy of the config pointed at the
    cluster (``ray.launcher: inline``, ``ray.address``). Picklable where ``fn`` is a module's."""

    def __init__(self, fn: Callable, cfg, *args):
        self.fn, self.cfg, self.args = fn, cfg, args

    def __call__(self, address: str):
        cfg = copy.deepcopy(self.cfg)
        cfg.ray.launcher, cfg.ray.address = "inline", address
        return self.fn(cfg, *self.args)


def in_own_job(ray_cfg) -> bool:
    """Whether work on Ray runs on a cluster of its own job (``ray.launcher: local | slurm``)
    rather than on this process's instance or ``ray.address``."""
    return ray_cfg.enabled and check_launcher("ray.launcher", ray_cfg.launcher, RAY_LAUNCHERS)


def ray_job_env() -> int:
    """Prepare this process's environment for submitting Ray cluster jobs: the clusters
    authenticate with a token of this submission's own, passed in the jobs' environment (SLURM
    and the local executor hand the submitter's environment to the job); returns a port."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    return 20000 + secrets.randbelow(20000)


def submit_ray_job(ray_cfg, work: Callable[[str], dict], folder: Path, job_name: str,
                   label: str) -> dict:
    """Run ``work`` in a submitit job (``ray_cfg.launcher``: local or slurm) holding its own Ray
    cluster; waits, echoing task 0's output, and returns what ``work`` returned."""
    if not check_launcher("ray.launcher", ray_cfg.launcher, RAY_LAUNCHERS):
        raise ValueError("ray.launcher: inline runs in this process, not in a job")
    folder = Path(folder) / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(parents=True, exist_ok=True)
    port = ray_job_env()
    ex = make_executor(ray_cfg, ray_cfg.launcher, folder, job_name)
    job = ex.submit(Job(RayCluster(ray_cfg, work, folder, port, label)))
    print(f"[{label}] submitted {ray_cfg.launcher} job {job.job_id}: a Ray cluster of "
          f"{ray_cfg.nodes} node(s); logs in {folder}", flush=True)
    # the work's own progress lines, from task 0's output
    return follow_job(job, folder / f"{job.job_id}_0_log.out")
