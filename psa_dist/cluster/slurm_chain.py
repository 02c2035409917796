"""A chain of dependent SLURM jobs, submitted at once: each starts only when the previous one
succeeded (``--dependency=afterok:ID``). A failed job leaves the later ones never run: SLURM marks
them DependencyNeverSatisfied and, with ``--kill-on-invalid-dep=yes`` (the default here), cancels
them. The job ids are recorded in a JSON file; a second submission refuses while jobs of the
recorded one are still queued.

A failed step is tried again, up to ``retries`` times, before the chain stops (:class:`Retrying`):
the failing job requeues itself (``scontrol requeue``, what submitit does on preemption) instead
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
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..util.atomic import atomic_write_json
from .launch import executor_params, make_executor

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


class Retrying:
    """A chain step's callable that, when it raises inside a SLURM job with retries left, requeues
    its job instead of failing it. Picklable; ``checkpoint`` (submitit's preemption hook) is the
    wrapped callable's, still wrapped, so a preempted step requeues as it did and keeps retrying."""

    def __init__(self, fn, retries: int, folder: Path):
        self.fn, self.retries, self.folder = fn, retries, Path(folder)

    def __call__(self):
        try:
            return self.fn()
        except Exception as e:   # noqa: BLE001 - any failure of the step is what a retry is for
            if not self._requeued(e):
                raise
            # No result file (the job is not over), and no exit of our own: a task ending non-zero
            # before slurmctld has finished the requeue can mark the job FAILED, and its
            # dependants DependencyNeverSatisfied (seen on the local cluster); the requeue kills
            # this task. Bounded, in case it never does.
            time.sleep(300)
            sys.exit(1)

    def failures(self, job_id: str) -> list[Path]:
        """The failed attempts of job ``job_id`` so far (one file each, holding the error)."""
        return sorted(self.folder.glob(f"{job_id}.failed-attempt-*"))

    def _requeued(self, error: Exception) -> bool:
        job_id = os.environ.get("SLURM_JOB_ID")
        if not job_id or self.retries <= 0:
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

    def checkpoint(self, *args, **kwargs):
        import submitit
        inner = getattr(self.fn, "checkpoint", None)
        if inner is None:
            return None      # not checkpointable: submitit does not requeue it on preemption
        delayed = inner(*args, **kwargs)
        if delayed is None:
            return None
        return submitit.helpers.DelayedSubmission(
            Retrying(delayed.function, self.retries, self.folder), *delayed.args, **delayed.kwargs)


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
    (:class:`Retrying`). Returns the submitit jobs."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    jobs, rows, prev = [], [], None
    for step in steps:
        extra = _params(step, prev, keep_blocked)
        where = Path(folder) / f"{stamp}-{os.getpid()}" / step.name
        where.mkdir(parents=True, exist_ok=True)
        ex = make_executor(step.shape, "slurm", where, f"{prefix}-{step.name}", **extra)
        job = ex.submit(Retrying(step.make_job(where), retries, where))
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
