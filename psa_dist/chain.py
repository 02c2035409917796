"""`psa-dist submit`: the whole pipeline as a chain of SLURM jobs, submitted at once.

One job per step, each starting only when the previous one succeeded (``--dependency=afterok:ID``):

=============  ==========================================================================
train-cls      DDP job with ``train_cls``'s shape (nodes x tasks, GPUs, partition, ...)
cams           ``ray`` section's shape: a Ray cluster over the job's nodes (``ray_job.py``)
aff-labels     the same
train-aff      DDP job with ``train_aff``'s shape
random-walk    Ray job as ``cams``
train-seg      DDP job with ``train_seg``'s shape (and the fully supervised one if seg_full)
eval-report    one task of ``train_seg``'s partition/account, one GPU if the trainers have GPUs
=============  ==========================================================================

Inside its allocation each job runs its stage through :func:`psa_dist.pipeline.run_pipeline`, the
same code as ``psa-dist <stage>``: training ranks take their place from submitit's environment
(the ``torchrun`` path of :mod:`psa_dist.submit`), label stages drive the Ray cluster that
:class:`psa_dist.ray_job.RayStageJob` starts. Stages already marked done are not submitted, so the
same command after a failure resubmits from the failed step on. A failed job leaves the later ones
never run: SLURM marks them DependencyNeverSatisfied and, with ``--kill-on-invalid-dep=yes``,
cancels them. The job ids go to ``out_dir/stages/submitted.json``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import secrets
import subprocess
import time
from pathlib import Path

from .config import Config
from .ray_job import RayStageJob
from .shards import atomic_write_json

# (job name, stages it runs); together they are pipeline.STAGES in order (tested). The modules
# that import torch are imported where used, so that `psa-dist` stays quick to start.
CHAIN = [("train-cls", ["train_cls"]), ("cams", ["cams"]), ("aff-labels", ["aff_labels"]),
         ("train-aff", ["train_aff"]), ("random-walk", ["random_walk"]),
         ("train-seg", ["train_seg"]), ("eval-report", ["eval", "report"])]
ALL_STAGES = [s for _, stages in CHAIN for s in stages]
TRAINERS = {"train_cls": "train_cls", "train_aff": "train_aff", "train_seg": "train_seg"}
LABELS = ("cams", "aff_labels", "random_walk")
# sbatch parameters every job of the chain gets: a job whose dependency failed is cancelled
# instead of waiting in the queue for ever
CHAIN_SBATCH = {"kill_on_invalid_dep": "yes"}


class ChainError(RuntimeError):
    """A chain that cannot be submitted (e.g. an earlier submission is still queued)."""


def in_allocation(cfg: Config) -> Config:
    """The config as a job of the chain runs it: trainers as ranks of this job (``torchrun``-style
    launcher, ranks from submitit's environment), label stages on the job's own Ray cluster."""
    cfg = copy.deepcopy(cfg)
    for key in TRAINERS.values():
        getattr(cfg, key).launcher = "torchrun"
    cfg.ray.launcher = "inline"
    return cfg


def _finished(cfg: Config, stages: list[str]) -> dict:
    out = Path(cfg.out_dir) / "stages"
    return {s: json.loads((out / f"{s}.json").read_text()) for s in stages
            if (out / f"{s}.json").is_file()}


class StageJob:
    """A chain step that runs in this job's tasks: training stages (every task a DDP rank) and,
    as one task, eval + report or a label stage with ``ray.enabled=false``. Picklable."""

    def __init__(self, cfg: Config, stages: list[str]):
        self.cfg, self.stages = cfg, list(stages)

    def __call__(self) -> dict:
        from .dist import _submitit_env
        from .pipeline import run_pipeline
        env = _submitit_env()
        if env is not None:     # RANK, WORLD_SIZE, ... before the pipeline asks who is rank 0
            os.environ.update(env)
        run_pipeline(in_allocation(self.cfg), stages=self.stages)
        return _finished(self.cfg, self.stages)

    def checkpoint(self, *args, **kwargs):
        # preempted or timed out (SLURM's USR2): requeue; trainers resume from their checkpoint,
        # a finished stage is skipped by its marker
        import submitit
        return submitit.helpers.DelayedSubmission(StageJob(self.cfg, self.stages))


class RayChainJob(RayStageJob):
    """A label stage of the chain: :class:`RayStageJob`'s cluster, and on it the stage as
    ``psa-dist <stage> ray.address=...`` runs it (resume, marker, summary)."""

    def run_stage(self, cfg: Config) -> dict:
        from .pipeline import run_pipeline
        run_pipeline(cfg, stages=[self.stage])
        return _finished(cfg, [self.stage])


def job_shape(cfg: Config, name: str, stages: list[str]):
    """The section whose resources a step's job asks for (train_*, ray, or derived for eval)."""
    if stages[0] in TRAINERS:
        return getattr(cfg, TRAINERS[stages[0]])
    if stages[0] in LABELS:
        if cfg.ray.enabled:
            return cfg.ray
        return dataclasses.replace(cfg.ray, nodes=1, tasks_per_node=1)
    seg = cfg.train_seg          # eval + report: one task on the segmenter's kind of node
    return dataclasses.replace(seg, nodes=1, tasks_per_node=1, gpus_per_node=min(seg.gpus_per_node, 1))


def job_callable(cfg: Config, name: str, stages: list[str], folder: Path):
    if stages[0] in LABELS and cfg.ray.enabled:
        return RayChainJob(in_allocation(cfg), stages[0], folder, 20000 + secrets.randbelow(20000))
    return StageJob(cfg, stages)


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


def submit_chain(cfg: Config, config_path: str | None = None, dry_run: bool = False,
                 force: bool = False, keep_blocked: bool = False) -> list:
    """Submit the steps not yet done as dependent SLURM jobs; returns the submitit jobs (dry run:
    the sbatch parameters of each step). ``keep_blocked``: after a failure, leave the later jobs
    pending (reason DependencyNeverSatisfied) instead of having SLURM cancel them."""
    out = Path(cfg.out_dir)
    from .pipeline import ensure_dataset
    from .submit import executor_params, make_executor
    record = out / "stages" / "submitted.json"
    if not dry_run:
        ensure_dataset(cfg)      # a missing dataset fails here, not in the first job
        if record.is_file() and not force:
            prev = [j["job_id"] for j in json.loads(record.read_text())["jobs"]]
            live = queued(prev)
            if live:
                raise ChainError(f"{record}: jobs {', '.join(live)} of an earlier submission are "
                                 f"still queued (see squeue; those pending with reason "
                                 f"DependencyNeverSatisfied can never start): wait for them, "
                                 f"`scancel {' '.join(live)}`, or pass --force to submit anyway")
        if cfg.ray.enabled:      # the Ray clusters authenticate with a token of this chain's own
            os.environ.setdefault("RAY_AUTH_MODE", "token")
            os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    done = set(_finished(cfg, ALL_STAGES))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    jobs, rows, prev_id = [], [], None
    for name, stages in CHAIN:
        if all(s in done for s in stages):
            print(f"[submit] {name}: done (stages/{stages[-1]}.json), not submitted", flush=True)
            continue
        shape = job_shape(cfg, name, stages)
        chain_sbatch = {**CHAIN_SBATCH, **({"kill_on_invalid_dep": "no"} if keep_blocked else {})}
        extra = {"slurm_additional_parameters": {**chain_sbatch, **(
            executor_params(shape, "slurm", "").get("slurm_additional_parameters") or {})}}
        if prev_id is not None:
            extra["slurm_dependency"] = f"afterok:{prev_id}"
        job_name = f"psa-{cfg.name}-{name}"
        if dry_run:
            params = {**executor_params(shape, "slurm", job_name), **extra}
            if prev_id is not None:
                params["slurm_dependency"] = f"afterok:<{prev_id}>"
            print(f"[submit] {name} ({', '.join(stages)}):\n  " + "\n  ".join(sbatch_lines(params)),
                  flush=True)
            rows.append({"step": name, "stages": stages, "sbatch": sbatch_lines(params)})
            prev_id = name
            continue
        folder = out / "stages" / "submitit" / f"{stamp}-{os.getpid()}" / name
        folder.mkdir(parents=True, exist_ok=True)
        ex = make_executor(shape, "slurm", folder, job_name, **extra)
        job = ex.submit(job_callable(cfg, name, stages, folder))
        prev_id = job.job_id
        jobs.append(job)
        rows.append({"step": name, "stages": stages, "job_id": job.job_id, "folder": str(folder),
                     "nodes": shape.nodes, "dependency": extra.get("slurm_dependency")})
        print(f"[submit] {name}: job {job.job_id}" +
              (f" after {extra['slurm_dependency']}" if "slurm_dependency" in extra else "") +
              f"; logs in {folder}", flush=True)
    if dry_run:
        return rows
    if not jobs:
        print("[submit] every stage is done; nothing submitted", flush=True)
        return jobs
    ids = ",".join(j.job_id for j in jobs)
    atomic_write_json(record, {"config": str(Path(config_path).resolve()) if config_path else None,
                               "out_dir": str(out), "submitted": stamp, "jobs": rows})
    print(f"[submit] {len(jobs)} jobs; ids in {record}\n"
          f"  follow:  squeue -j {ids} -o '%.10i %.22j %.9T %.24r'\n"
          f"  after:   sacct -j {ids} -X -o JobID,JobName%22,State,Elapsed,Reason%24", flush=True)
    return jobs
