"""The thin launcher of the training stages: where the ranks of a trainer run.

``train.launcher`` (per trainer, in the config or ``--launcher`` on the command line):

* ``inline``: in this process, one rank.
* ``torchrun``: this process is one rank that torchrun started (``RANK``, ``WORLD_SIZE``, ...).
* ``local``: submitit's local executor, ``tasks_per_node`` processes on this machine.
* ``slurm``: submitit's SLURM executor: an sbatch job with ``nodes`` x ``tasks_per_node`` ranks and
  the usual knobs (partition, account, qos, constraint, time, memory, GPUs and CPUs, extra sbatch
  lines) from the config.

A submitted trainer is a :class:`TrainJob`: every rank calls it, and on preemption or timeout
(SLURM's USR2) submitit calls its ``checkpoint()`` on rank 0, which requeues the same job; the
requeued ranks resume from the last checkpoint the engine wrote. The caller waits, prints the
trainer's JSON log lines as they appear, and gets the rank-0 summary, or the job's error.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from .config import Config
from .train_main import run_trainer, train_config

LAUNCHERS = ("inline", "torchrun", "local", "slurm")


class TrainJob:
    """A training stage as a submitit job (picklable: a config and a trainer name)."""

    def __init__(self, cfg: Config, kind: str):
        self.cfg, self.kind = cfg, kind

    def __call__(self) -> dict:
        return run_trainer(self.cfg, self.kind)

    def checkpoint(self, *args, **kwargs):
        # Called by submitit on rank 0 when the job is preempted or times out. The engine has been
        # writing checkpoint.pth every checkpoint_every steps; the requeued job resumes from it.
        import submitit
        return submitit.helpers.DelayedSubmission(TrainJob(self.cfg, self.kind))


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


def launch_training(cfg: Config, kind: str) -> dict:
    """Run trainer ``kind`` with its configured launcher and return the rank-0 summary."""
    tcfg = train_config(cfg, kind)
    launcher = tcfg.launcher
    if launcher not in LAUNCHERS:
        raise ValueError(f"train launcher {launcher!r} unknown (train.launcher: one of {LAUNCHERS})")
    if launcher == "torchrun" and "WORLD_SIZE" not in os.environ:
        raise RuntimeError("launcher=torchrun but WORLD_SIZE is not set: start this command with "
                           "`torchrun --nproc_per_node=N -m psa_dist.cli ...`")
    if launcher in ("inline", "torchrun"):
        return run_trainer(cfg, kind)
    out = Path(cfg.out_dir) / kind
    # A folder per submission: SLURM job ids restart on a fresh cluster, and submitit would read an
    # old job's result pickle from a reused folder.
    folder = out / "submitit" / time.strftime("%Y%m%d-%H%M%S")
    folder = folder.with_name(f"{folder.name}-{os.getpid()}")
    ex = make_executor(tcfg, launcher, folder, f"psa-{cfg.name}-{kind}")
    job = ex.submit(TrainJob(cfg, kind))
    print(f"[{kind}] submitted {launcher} job {job.job_id} ({tcfg.nodes} node(s) x "
          f"{tcfg.tasks_per_node or max(tcfg.gpus_per_node, 1)} task(s)); logs in {folder}",
          flush=True)
    return follow_job(job, out / "log.jsonl")


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
