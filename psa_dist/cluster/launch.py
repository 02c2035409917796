"""submitit jobs: the executor for a job shape (a ``train_*`` or the ``ray`` section), and waiting
for a job while echoing its log. The launchers a job shape's ``launcher`` names:

* ``inline``: in this process, one rank.
* ``torchrun``: this process is one rank that torchrun started (``RANK``, ``WORLD_SIZE``, ...).
* ``local``: submitit's local executor, ``tasks_per_node`` processes on this machine.
* ``slurm``: submitit's SLURM executor: an sbatch job with ``nodes`` x ``tasks_per_node`` ranks and
  the usual knobs (partition, account, qos, constraint, time, memory, GPUs and CPUs, extra sbatch
  lines) from the config.

Every submitted job runs a :class:`Job`, the one job class: it requeues itself on preemption and,
with retries, on failure. The caller waits, prints the job's log lines as they appear, and gets the
rank-0 result, or the job's error. This module is the one place that knows the launchers: a new
cluster backend is a module of ``cluster/`` giving an executor here.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

LAUNCHERS = ("inline", "torchrun", "local", "slurm")      # a trainer's
RAY_LAUNCHERS = ("inline", "local", "slurm")              # the Ray cluster of a label stage's
SUBMITTED = ("local", "slurm")                            # those that submit a job


def check_launcher(field: str, launcher: str, allowed: tuple = LAUNCHERS) -> bool:
    """Whether ``launcher`` (the value of config field ``field``) submits a job; an unknown one
    is an error naming the field."""
    if launcher not in allowed:
        raise ValueError(f"{field}: {launcher!r} unknown (one of {', '.join(allowed)})")
    if launcher == "torchrun" and "WORLD_SIZE" not in os.environ:
        raise RuntimeError("launcher=torchrun but WORLD_SIZE is not set: start this command with "
                           "`torchrun --nproc_per_node=N -m psa_dist.cli ...`")
    return launcher in SUBMITTED


class Job:
    """The one submitit job class: every task of the job calls ``work()`` (picklable: a
    ``functools.partial`` of a module function, or an object with ``__call__``). On preemption or
    timeout (SLURM's USR2) submitit calls :meth:`checkpoint` on rank 0, which requeues the same
    job; work that resumes from what it wrote (a trainer's checkpoint, a label stage's shards, a
    stage's marker) continues where it was, as MAE's and DINO's one wrapper does. With
    ``retries`` (a chain step, ``submit_retries``), a job whose work raises inside SLURM requeues
    itself up to that many times before failing; ``folder`` keeps one file per failed attempt."""

    def __init__(self, work: Callable[[], Any], retries: int = 0, folder: Path | None = None):
        self.work, self.retries, self.folder = work, retries, folder and Path(folder)

    def __call__(self):
        try:
            return self.work()
        except Exception as e:   # noqa: BLE001 - any failure of the step is what a retry is for
            if not self._requeued(e):
                raise
            # No result file (the job is not over), and no exit of our own: a task ending non-zero
            # before slurmctld has finished the requeue can mark the job FAILED, and its
            # dependants DependencyNeverSatisfied (seen on the local cluster); the requeue kills
            # this task. Bounded, in case it never does.
            time.sleep(300)
            sys.exit(1)

    def checkpoint(self, *args, **kwargs):
        import submitit
        return submitit.helpers.DelayedSubmission(Job(self.work, self.retries, self.folder))

    def failures(self, job_id: str) -> list[Path]:
        """The failed attempts of job ``job_id`` so far (one file each, holding the error)."""
        return sorted(self.folder.glob(f"{job_id}.failed-attempt-*")) if self.folder else []

    def _requeued(self, error: Exception) -> bool:
        job_id = os.environ.get("SLURM_JOB_ID")
        if not job_id or self.retries <= 0 or self.folder is None:
            return False
        attempt = os.environ.get("SLURM_RESTART_COUNT", "0")
        mark = self.folder / f"{job_id}.failed-attempt-{attempt}"
        try:
            # one task per attempt records it and decides (every rank of a DDP step may fail)
            fd = os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False     # another task of this attempt is requeueing the job
        with os.fdopen(fd, "w") as f:
            f.write("".join(traceback.format_exception(error)))
        failed = len(self.failures(job_id))
        if failed > self.retries:
            print(f"[submit] job {job_id} failed {failed} times (submit_retries={self.retries}): "
                  f"not requeued, the chain stops here", file=sys.stderr, flush=True)
            return False
        r = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True,
                           timeout=60)
        if r.returncode != 0:
            print(f"[submit] job {job_id} failed and could not be requeued: "
                  f"{(r.stderr or r.stdout).strip()}", file=sys.stderr, flush=True)
            return False
        print(f"[submit] job {job_id} failed ({type(error).__name__}: {error}); requeued, retry "
              f"{failed} of {self.retries} (the error: {mark})", file=sys.stderr, flush=True)
        return True


def sbatch_extra(lines: list) -> dict:
    """``["--mail-type=END", "exclusive"]`` -> submitit's ``additional_parameters``."""
    out = {}
    for item in lines:
        key, eq, value = str(item).lstrip("-").partition("=")
        if not key:
            raise ValueError(f"train.sbatch_extra: cannot read {item!r} (expected --key=value)")
        out[key.replace("-", "_")] = value if eq else True
    return out


def executor_params(tcfg, launcher: str, name: str) -> dict:
    """submitit's ``update_parameters`` for a job of shape ``tcfg`` (a train_* or the ray section)."""
    gpus = tcfg.gpus_per_node
    tasks = tcfg.tasks_per_node or max(gpus, 1)
    params = {"name": name, "timeout_min": tcfg.time_min, "nodes": tcfg.nodes,
              "tasks_per_node": tasks, "cpus_per_task": tcfg.cpus_per_task}
    if gpus:
        params["gpus_per_node"] = gpus
    if tcfg.mem_gb:
        params["mem_gb"] = tcfg.mem_gb
    if launcher not in SUBMITTED:
        raise ValueError(f"launcher {launcher!r} submits no job (one of {', '.join(SUBMITTED)})")
    if launcher == "local":
        if tcfg.nodes != 1:
            raise ValueError(f"train.nodes={tcfg.nodes}: the local launcher runs on one node")
    else:
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(tcfg, key):
                params[f"slurm_{key}"] = getattr(tcfg, key)
        if tcfg.sbatch_extra:
            params["slurm_additional_parameters"] = sbatch_extra(tcfg.sbatch_extra)
    return params


def make_executor(tcfg, launcher: str, folder: Path, name: str, **extra):
    """A submitit executor for ``tcfg``'s job shape; ``extra``: more submitit parameters."""
    import submitit
    ex = submitit.AutoExecutor(folder=folder, cluster="local" if launcher == "local" else "slurm")
    ex.update_parameters(**{**executor_params(tcfg, launcher, name), **extra})
    return ex


def follow_job(job, log_path: Path | None):
    """Wait for ``job``, echoing ``log_path``'s new lines; rank 0's result, or the job's error
    (``results()`` raises the first failed task's traceback)."""
    if log_path is not None:
        follow(job, log_path)
    return job.results()[0]


def follow(job, log_path: Path, poll_s: float = 1.0) -> None:
    """Echo the trainer's new JSON log lines until the job ends (the job's own progress view)."""
    pos = log_path.stat().st_size if log_path.is_file() else 0   # only what this job adds
    while True:
        finished = job.done()
        if log_path.is_file():
            with open(log_path) as f:
                f.seek(pos)
                chunk = f.read()
            # only whole lines; a partial one is read on the next poll
            cut = chunk.rfind("\n") + 1
            if cut:
                print(chunk[:cut], end="", flush=True)
                pos += len(chunk[:cut].encode())
        if finished:
            return
        time.sleep(poll_s)
