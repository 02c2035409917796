"""submitit jobs: the executor for a job shape (a ``train_*`` or the ``ray`` section), and waiting
for a job while echoing its log. The launchers a job shape's ``launcher`` names:

* ``inline``: in this process, one rank.
* ``torchrun``: this process is one rank that torchrun started (``RANK``, ``WORLD_SIZE``, ...).
* ``local``: submitit's local executor, ``tasks_per_node`` processes on this machine.
* ``slurm``: submitit's SLURM executor: an sbatch job with ``nodes`` x ``tasks_per_node`` ranks and
  the usual knobs (partition, account, qos, constraint, time, memory, GPUs and CPUs, extra sbatch
  lines) from the config.

The caller waits, prints the job's log lines as they appear, and gets the rank-0 result, or the
job's error.
"""
from __future__ import annotations

import time
from pathlib import Path

LAUNCHERS = ("inline", "torchrun", "local", "slurm")


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
