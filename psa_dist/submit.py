"""`psa-dist submit`: the whole pipeline as a chain of SLURM jobs, submitted at once.

One job per step of the stage table's chain (``stages/table.py``: ``chain_steps``), each starting
only when the previous one succeeded:

=============  ==========================================================================
train-cls      DDP job with ``train_cls``'s shape (nodes x tasks, GPUs, partition, ...)
cams           ``ray`` section's shape: a Ray cluster over the job's nodes (``cluster/ray_job.py``)
aff-labels     the same
train-aff      DDP job with ``train_aff``'s shape
random-walk    Ray job as ``cams``
train-seg      DDP job with ``train_seg``'s shape (and the fully supervised one if seg_full)
eval-report    one task of ``train_seg``'s partition/account, one GPU if the trainers have GPUs
=============  ==========================================================================

Inside its allocation each job runs its stages through :func:`psa_dist.pipeline.run_pipeline`,
the same code as ``psa-dist <stage>``: training ranks take their place from submitit's environment
(the ``torchrun`` launcher), label stages drive the Ray cluster the job started. Stages already
marked done are not submitted, so the same command after a failure resubmits from the failed step
on; before that, a failed step's job requeues itself up to ``submit_retries`` times (same job id,
so the later jobs still wait on it: ``cluster/slurm_chain.py``), which a transient failure (a node
lost, a file system hiccup) does not outlast; the chain is checked (needs, optional packages) before anything is submitted, and a job
shape that does not fit its work (no GPU for a GPU-sized model, more loader workers than CPUs) is
a warning on stderr (``stages/job_shape.py``). The job ids go to ``out_dir/stages/submitted.json``.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
from pathlib import Path

from .cluster import slurm_chain
from .cluster.ray_job import AtAddress, RayCluster, ray_job_env
from .config import Config
from .pipeline import check_chain, run_pipeline
from .stages import table
from .stages.run_dir import Run, RunDir, ensure_dataset
from .stages.job_shape import warn_shape
from .util.dist import submitit_env


def in_allocation(cfg: Config) -> Config:
    """The config as a job of the chain runs it: trainers as ranks of this job (``torchrun``-style
    launcher, ranks from submitit's environment), label stages on the job's own Ray cluster."""
    cfg = copy.deepcopy(cfg)
    for model in table.MODELS.values():
        getattr(cfg, model.section).launcher = "torchrun"
    cfg.ray.launcher = "inline"
    return cfg


def _finished(cfg: Config, stages: list[str]) -> dict:
    run = RunDir(cfg.out_dir)
    return {s: json.loads(run.marker(s).read_text()) for s in stages
            if run.done_for(s, cfg.method)}


def run_stages(cfg: Config, stages: list[str]) -> dict:
    """A chain step's stages as its job runs them (``in_allocation``); on the Ray cluster of its
    own job (``AtAddress``), a label stage as ``psa-dist <stage> ray.address=...`` runs it
    (resume, marker, summary). A requeued job (preempted, or retried) skips finished stages by
    their markers, and trainers resume from their checkpoints."""
    run_pipeline(in_allocation(cfg), stages=stages)
    return _finished(cfg, stages)


def run_stages_in_job(cfg: Config, stages: list[str]) -> dict:
    """A chain step in this job's tasks: a train stage (every task a DDP rank) and, as one task,
    eval + report or a label stage with ``ray.enabled=false``."""
    env = submitit_env()
    if env is not None:     # RANK, WORLD_SIZE, ... before the pipeline asks who is rank 0
        os.environ.update(env)
    return run_stages(cfg, stages)


def job_shape(cfg: Config, stages: list[str]):
    """The section whose resources a step's job asks for (train_*, ray, or derived for eval)."""
    first = table.stage(stages[0])
    if first.kind == "train":
        return getattr(cfg, first.section)
    if first.kind == "labels":
        if cfg.ray.enabled:
            return cfg.ray
        return dataclasses.replace(cfg.ray, nodes=1, tasks_per_node=1)
    seg = cfg.train_seg          # eval + report: one task on the segmenter's kind of node
    return dataclasses.replace(seg, nodes=1, tasks_per_node=1,
                               gpus_per_node=min(seg.gpus_per_node, 1))


def job_callable(cfg: Config, stages: list[str], folder: Path):
    """What the tasks of a step's job run; ``folder``: the step's own (logs, Ray's marker)."""
    if table.stage(stages[0]).kind == "labels" and cfg.ray.enabled:
        return RayCluster(cfg.ray, AtAddress(run_stages, cfg, list(stages)), folder,
                          ray_job_env(), stages[0])
    return functools.partial(run_stages_in_job, cfg, list(stages))


def submit_chain(cfg: Config, config_path: str | None = None, dry_run: bool = False,
                 force: bool = False, keep_blocked: bool = False) -> list:
    """Submit the steps not yet done as dependent SLURM jobs; returns the submitit jobs (dry run:
    the sbatch parameters of each step). ``keep_blocked``: after a failure, leave the later jobs
    pending (reason DependencyNeverSatisfied) instead of having SLURM cancel them."""
    out = Path(cfg.out_dir)
    record = RunDir(out).submitted
    done = set(_finished(cfg, table.stages_of(cfg)))
    steps = []
    for name, stages in table.chain_steps(cfg):
        if all(s in done for s in stages):
            print(f"[submit] {name}: done (stages/{stages[-1]}.json), not submitted", flush=True)
            continue
        steps.append(slurm_chain.Step(name, stages, job_shape(cfg, stages),
                                      functools.partial(job_callable, cfg, stages)))
    to_submit = [s for step in steps for s in step.stages]
    warn_shape(cfg, to_submit, submit=True)     # a job without a GPU for ResNet-38: said first
    check_chain(cfg, to_submit, lambda s: s in done)
    prefix = f"psa-{cfg.name}"
    if dry_run:
        return slurm_chain.dry_run(steps, prefix, keep_blocked)
    ensure_dataset(cfg)          # a missing dataset fails here, not in the first job
    Run(cfg).check_same_dataset(force)
    if not force:
        slurm_chain.check_not_queued(record)
    jobs = slurm_chain.submit(steps, prefix, RunDir(out).submitit, record,
                              keep_blocked=keep_blocked, retries=cfg.submit_retries, meta={
        "config": str(Path(config_path).resolve()) if config_path else None, "out_dir": str(out)})
    if not jobs:
        print("[submit] every stage is done; nothing submitted", flush=True)
    return jobs
