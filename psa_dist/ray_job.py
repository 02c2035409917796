"""A label stage on a Ray cluster started inside a submitit job (``ray.launcher: slurm | local``):
the same thing ``launch/ray_slurm.sbatch`` does, submitted from Python.

Every task of the job is one Ray node: task 0 starts the head and, once every node has joined,
runs the stage against it (the usual :class:`~psa_dist.ray_labels.ShardedLabelJob`); the other
tasks start Ray workers and wait until task 0 marks the stage finished. The cluster uses token
authentication with a secret made by the submitter and handed to the job in its environment.
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

from .config import Config


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


class RayStageJob:
    """Picklable: a config, a stage and the folder where task 0 leaves its "finished" marker."""

    def __init__(self, cfg: Config, stage: str, folder: Path, port: int):
        self.cfg, self.stage, self.folder, self.port = cfg, stage, Path(folder), port

    def __call__(self) -> dict | None:
        import submitit
        env = submitit.JobEnvironment()
        head = os.environ.get("PSA_MASTER_ADDR") or socket.gethostbyname(env.hostnames[0])
        address = f"{head}:{self.port}"
        cpus = os.environ.get("SLURM_CPUS_PER_TASK") or str(self.cfg.ray.cpus_per_task)
        gpus = str(len([g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g]))
        tmp = f"/tmp/ray-psa-{env.job_id}"          # short: Ray's socket paths are length-limited
        os.environ.setdefault("RAY_TMPDIR", tmp)
        cmd = ray_start_command(self.cfg.ray, env.global_rank == 0, head, self.port, cpus, gpus, tmp)
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

    def checkpoint(self, *args, **kwargs):
        # Called by submitit when the job is preempted or times out (SLURM's USR2): requeue the
        # same job. The stage skips the shards whose outputs exist, so it resumes where it was.
        import submitit
        return submitit.helpers.DelayedSubmission(type(self)(self.cfg, self.stage, self.folder,
                                                             self.port))

    def run_stage(self, cfg: Config) -> dict:
        """The work of task 0 once the cluster is up (``cfg.ray.address`` points at it)."""
        from .pipeline import Run, stage_labels
        return stage_labels(Run(cfg), self.stage)

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
        print(f"[{self.stage}] Ray cluster of {nodes} node(s) at {address}: "
              f"{ray.cluster_resources()}", flush=True)
        cfg = copy.deepcopy(self.cfg)
        cfg.ray.launcher, cfg.ray.address = "inline", address
        try:
            return self.run_stage(cfg)
        finally:
            ray.shutdown()
            done.touch()


def submit_label_stage(cfg: Config, stage: str) -> dict:
    """Run ``stage`` in a submitit job holding its own Ray cluster; returns the stage summary."""
    from .submit import follow_job, make_executor
    rc = cfg.ray
    if rc.launcher not in ("local", "slurm"):
        raise ValueError(f"ray.launcher: expected inline, local or slurm, got {rc.launcher!r}")
    folder = Path(cfg.out_dir) / "stages" / "submitit" / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(parents=True, exist_ok=True)
    # The job's Ray cluster authenticates with a token of its own, passed in the job's environment
    # (SLURM and the local executor hand the submitter's environment to the job).
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    port = 20000 + secrets.randbelow(20000)
    ex = make_executor(rc, rc.launcher, folder, f"psa-{cfg.name}-{stage}")
    job = ex.submit(RayStageJob(cfg, stage, folder, port))
    print(f"[{stage}] submitted {rc.launcher} job {job.job_id}: a Ray cluster of {rc.nodes} "
          f"node(s); logs in {folder}", flush=True)
    # the stage's own progress lines, from task 0's output
    return follow_job(job, folder / f"{job.job_id}_0_log.out")
