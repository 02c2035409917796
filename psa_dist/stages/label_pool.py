"""The label stages (the modules of ``label_stages/``) over the train shards: the worker that
turns one input shard into one output shard, and where the stage runs.

``ray.enabled`` (default): a :class:`~psa_dist.cluster.shard_pool.ShardPool` of Ray actors, on a
local instance or ``ray.address``, or (``ray.launcher: local | slurm``) on a Ray cluster that a
submitit job starts for the stage. ``ray.enabled: false``: the same pool in this process. Either
way the failure accounting (transient errors retried, corrupt shards recorded at once), the
summary, the per-shard log and the device choice (``device``) are the same, and shards whose
output exists are skipped.
"""
from __future__ import annotations

import os
import sys

import torch

from ..cluster.ray_job import AtAddress, in_own_job, submit_ray_job
from ..cluster.shard_pool import ShardPool, default_transient, ensure_ray
from ..config import Config
from ..data.shards import SampleError, ShardError, output_path
from . import table
from .label_stages.base import ShardContext
from .model_factory import load_trained
from .run_dir import Run, worker_device


class LabelWorker:
    """One label-stage worker: loads its stage's model once (on ``device``), then turns input
    shards into output shards by its stage's module (``label_stages/``)."""

    def __init__(self, stage: str | table.Stage, cfg: Config, device: str = "cpu",
                 threads: int = 1):
        torch.set_num_threads(threads)
        # the driver hands over the row itself: a stage added to the table at run time
        # (table.add_stage) is known to the driver's table only, not to an actor's
        row = stage if isinstance(stage, table.Stage) else table.stage(stage)
        self.stage, self.cfg = table.resolve(row.module), cfg
        self.run = Run(cfg, prepare=False)   # the driver made the dataset; read it only
        self.device = worker_device(device)
        models = row.uses_models
        stage = row.name
        model = load_trained(self.run, models[0], self.device) if models else None
        self.ctx = ShardContext(cfg, self.run.num_classes, self.device, model)
        self.precision = self.stage.choose_precision(self.ctx)
        if self.precision is not None:
            self.ctx.dtype = self.precision.dtype
            print(f"[{stage}] precision: {self.precision.describe()} on {self.device.type}",
                  flush=True)

    def pid(self) -> int:
        return os.getpid()

    def process(self, in_shard: str, out_shard: str) -> dict:
        inputs = [output_path(self.run.stage_dir(name), in_shard) for name in self.stage.reads]
        res = self.stage.process(self.ctx, in_shard, inputs, out_shard)
        res["pid"] = os.getpid()
        res["device"] = str(self.device)     # where the model ran: the GPU check reads it here
        ray = sys.modules.get("ray")     # imported only where the pool runs on Ray
        if ray is not None and ray.is_initialized():
            res["node"] = ray.get_runtime_context().get_node_id()
            res["gpus"] = [str(g) for g in ray.get_gpu_ids()]
        return res


def transient_error(exc: BaseException) -> bool:
    """Whether a shard's error is worth another try. A corrupt shard or an undecodable sample
    fails the same way every time; a ShardError raised from an I/O error while reading (EIO, a
    stale NFS handle: the data layer names the shard and keeps the OSError as the cause) may not,
    nor may OSError, CUDA out of memory or another RuntimeError."""
    if isinstance(exc, SampleError):
        return False
    if isinstance(exc, ShardError):
        cause = exc.__cause__
        return isinstance(cause, OSError) and not isinstance(
            cause, (FileNotFoundError, IsADirectoryError, NotADirectoryError))
    return default_transient(exc)


def run_pool(run: Run, name: str, worker_cls, worker_args: tuple, *, uses_model: bool,
             log_path, use_ray: bool | None = None, num_actors: int = 0) -> ShardPool:
    """A :class:`ShardPool` of ``worker_cls`` for this run: Ray actors with ``ray.enabled`` (or
    ``use_ray``), else this process. Actors get GPUs where the work has a model and ``device``
    allows CUDA; ``device=cuda`` on a Ray cluster without GPUs is an error. Each actor's output
    goes to ``out_dir/stages/logs/<name>-<host>-<pid>.log``; retries and straggler copies follow
    ``ray.shard_retries``, ``ray.retry_backoff_s``, ``ray.speculate_after``/``speculate_min_s``."""
    cfg = run.cfg
    use_ray = cfg.ray.enabled if use_ray is None else use_ray
    if use_ray:
        ray = ensure_ray(cfg.ray, cfg.ray.num_cpus or None)
        if cfg.device.startswith("cuda") and not ray.cluster_resources().get("GPU"):
            raise RuntimeError(f"device={cfg.device}, but the Ray cluster has no GPU for {name}: "
                               f"set device=auto or cpu, or start Ray with GPUs")
    rc = cfg.ray
    return ShardPool(name, worker_cls, worker_args, use_ray=use_ray,
                     num_actors=num_actors or rc.num_actors,
                     use_gpus=uses_model and not cfg.device.startswith("cpu"),
                     max_failures=rc.max_failures, log_path=log_path,
                     local_device=str(run.device), local_threads=torch.get_num_threads(),
                     log_dir=run.actor_logs, shard_retries=rc.shard_retries,
                     retry_backoff_s=rc.retry_backoff_s, transient=transient_error,
                     speculate_after=rc.speculate_after, speculate_min_s=rc.speculate_min_s)


def label_pool(run: Run, stage: str, num_actors: int = 0, log_path=None) -> ShardPool:
    """The pool a label stage runs on (affinity labels are CAM thresholds and the dense CRF: CPU
    work, one actor per CPU even where there are GPUs)."""
    return run_pool(run, stage, LabelWorker, (table.stage(stage), run.cfg),
                    uses_model=bool(table.stage(stage).uses_models), num_actors=num_actors,
                    log_path=log_path or run.shard_log(stage))


def label_stage_of(cfg: Config, stage: str) -> dict:
    """Label stage ``stage`` of the run ``cfg`` (what a Ray cluster's job runs, ``AtAddress``)."""
    return run_label_stage(Run(cfg), stage)


def run_label_stage(run: Run, stage: str) -> dict:
    """Label stage ``stage`` over the train shards; returns its summary."""
    cfg = run.cfg
    if in_own_job(cfg.ray):
        return submit_ray_job(cfg.ray, AtAddress(label_stage_of, cfg, stage),
                              run.submitit, f"psa-{cfg.name}-{stage}", stage)
    tasks = list(zip(run.train_shards, run.label_shards(stage)))
    return label_pool(run, stage).run(tasks, run.shard_counts())
