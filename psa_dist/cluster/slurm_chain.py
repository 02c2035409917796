"""A chain of dependent SLURM jobs, submitted at once: each starts only when the previous one
succeeded (``--dependency=afterok:ID``). A failed job leaves the later ones never run: SLURM marks
them DependencyNeverSatisfied and, with ``--kill-on-invalid-dep=yes`` (the default here), cancels
them. The job ids are recorded in a JSON file; a second submission refuses while jobs of the
recorded one are still queued.

A failed step is tried again, up to ``retries`` times, before the chain stops
(:class:`~psa_dist.cluster.launch.Job` with ``retries``): the failing job requeues itself (``scontrol requeue``, what submitit does on preemption) instead
of ending FAILED. Requeued, it keeps its job id, so the later jobs' ``afterok`` dependency on it
still holds and nothing else is resubmitted or rewired; a fresh ``sbatch`` would get a new id, and
by then SLURM would already have cancelled the dependants of the failed one. Every chain job is
submitted with ``--requeue`` so that a site's ``JobRequeue=0`` does not forbid it. SLURM holds a
requeued job for a while (``BeginTime``, about two minutes by default) before it runs again. The
attempts are counted in the step's folder (one file per failed attempt, naming the error), not
with ``SLURM_RESTART_COUNT``, which preemptions raise too: a preempted and requeued step keeps
all its retries.

Generic: a step is a name, the job shape to ask for (a ``train_*`` or ``ray``-like section) and a
picklable callable; what the steps run is the caller's (``psa_dist/submit.py``).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..util.atomic import atomic_write_json
from .launch import Job, executor_params, make_executor

# sbatch parameters every job of a chain gets: a job whose dependency failed is cancelled instead
# of waiting in the queue for ever
CHAIN_SBATCH = {"kill_on_invalid_dep": "yes", "requeue": True}


class ChainError(RuntimeError):
    """A chain that cannot be submitted (e.g. an earlier submission is still queued)."""


@dataclass
class Step:
    name: str                       # the step's name; its job is "<prefix>-<name>"
    stages: list                    # what it runs, for the record and the dry run
    shape: Any                      # the job shape (nodes, tasks, GPUs, partition, ...)
    make_job: Callable[[Path], Callable[[], Any]]   # its folder -> what its tasks run


def sbatch_lines(params: dict) -> list[str]:
    """submitit parameters as the ``#SBATCH`` lines they become (for ``--dry-run``)."""
    names = {"name": "job-name", "timeout_min": "time", "tasks_per_node": "ntasks-per-node"}
    lines = []
    for key, value in params.items():
        if key == "slurm_additional_parameters":
            lines += [f"#SBATCH --{k.replace('_', '-')}" + ("" if v is True else f"={v}")
                      for k, v in value.items()]
            continue
        if key == "mem_gb":
            key, value = "mem", f"{value}GB"
        flag = names.get(key, key.removeprefix("slurm_")).replace("_", "-")
        lines.append(f"#SBATCH --{flag}={value}")
    return lines


def queued(ids: list[str]) -> list[str]:
    """Those of ``ids`` still in SLURM's queue (pending or running)."""
    if not ids:
        return []
    try:
        r = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(ids)], capture_output=True,
                           text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [i for i in r.stdout.split() if i in ids]


def check_not_queued(record: Path) -> None:
    """Refuse while jobs of the submission recorded in ``record`` are still queued."""
    if not record.is_file():
        return
    prev = [j["job_id"] for j in json.loads(record.read_text())["jobs"]]
    live = queued(prev)
    if live:
        raise ChainError(f"{record}: jobs {', '.join(live)} of an earlier submission are still "
                         f"queued (see squeue; those pending with reason DependencyNeverSatisfied "
                         f"can never start): wait for them, `scancel {' '.join(live)}`, or pass "
                         f"--force to submit anyway")


def _params(step: Step, prev: str | None, keep_blocked: bool) -> dict:
    chain_sbatch = {**CHAIN_SBATCH, **({"kill_on_invalid_dep": "no"} if keep_blocked else {})}
    extra = {"slurm_additional_parameters": {**chain_sbatch, **(
        executor_params(step.shape, "slurm", "").get("slurm_additional_parameters") or {})}}
    if prev is not None:
        extra["slurm_dependency"] = f"afterok:{prev}"
    return extra


def dry_run(steps: list[Step], prefix: str, keep_blocked: bool = False) -> list[dict]:
    """Each step's sbatch lines, printed, without submitting."""
    rows, prev = [], None
    for step in steps:
        name = f"{prefix}-{step.name}"
        params = {**executor_params(step.shape, "slurm", name),
                  **_params(step, f"<{prev}>" if prev else None, keep_blocked)}
        print(f"[submit] {step.name} ({', '.join(step.stages)}):\n  " +
              "\n  ".join(sbatch_lines(params)), flush=True)
        rows.append({"step": step.name, "stages": step.stages, "sbatch": sbatch_lines(params)})
        prev = step.name
    return rows


def submit(steps: list[Step], prefix: str, folder: Path, record: Path, meta: dict,
           keep_blocked: bool = False, retries: int = 0) -> list:
    """Submit ``steps`` as dependent jobs (logs under ``folder/<stamp>-<pid>/<step>``); their ids
    and ``meta`` go to ``record``. A step that fails is requeued up to ``retries`` times
    (:class:`~psa_dist.cluster.launch.Job`). Returns the submitit jobs."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    jobs, rows, prev = [], [], None
    for step in steps:
        extra = _params(step, prev, keep_blocked)
        where = Path(folder) / f"{stamp}-{os.getpid()}" / step.name
        where.mkdir(parents=True, exist_ok=True)
        ex = make_executor(step.shape, "slurm", where, f"{prefix}-{step.name}", **extra)
        job = ex.submit(Job(step.make_job(where), retries, where))
        prev = job.job_id
        jobs.append(job)
        rows.append({"step": step.name, "stages": step.stages, "job_id": job.job_id,
                     "folder": str(where), "nodes": step.shape.nodes,
                     "dependency": extra.get("slurm_dependency"), "retries": retries})
        print(f"[submit] {step.name}: job {job.job_id}" +
              (f" after {extra['slurm_dependency']}" if "slurm_dependency" in extra else "") +
              f"; logs in {where}", flush=True)
    if not jobs:
        return jobs
    ids = ",".join(j.job_id for j in jobs)
    atomic_write_json(record, {**meta, "submitted": stamp, "jobs": rows})
    print(f"[submit] {len(jobs)} jobs; ids in {record}\n"
          f"  follow:  squeue -j {ids} -o '%.10i %.22j %.9T %.24r'\n"
          f"  after:   sacct -j {ids} -X -o JobID,JobName%22,State,Elapsed,Reason%24", flush=True)
    return jobs
