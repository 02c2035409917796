"""The job shape a config asks for, checked against the work each stage does in it: warnings (not
errors) that ``psa-dist run`` and ``psa-dist submit`` print before anything runs or is submitted.

Two mistakes cost a cluster run hours without failing it, so they are said at once:

* a stage that computes with a GPU-sized network (ResNet-38 / ResNet-50 backbones, the
  DeepLabV3-ResNet50 segmenter) gets a SLURM job without a GPU while the config means to use one
  (``device`` auto or cuda): it then runs on the job's CPUs, days instead of hours, or one Ray actor
  per CPU each holding the model;
* a trainer's loader workers (``num_workers``) are as many as its CPUs (``cpus_per_task``) or more:
  with the rank's own process they share too few cores and slow each other down;
* a trainer's ranks and batch size against its training set (from ``dataset.json``, or the
  synthetic data's settings): a step larger than the set (ranks read their shares again), an epoch
  that leaves more than 5% of the samples for the next one (each rank's last, short batch), and
  more loader streams (ranks x ``num_workers``) than shards by 3x or more (a shard split between k
  streams is read k times from its start: ``data/train_data.epoch_shares``).

Which network a stage uses, and which config section gives its job, come from the stage table.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

from ..config import Config
from ..data.shards import read_dataset_json
from . import table



def _gpu_network(cfg: Config, stage: table.Stage) -> str | None:
    """The GPU-sized network the stage trains or loads, in words, or None (none, or a small one)."""
    for model in (*stage.models, *stage.uses_models):
        what = table.kind(model).gpu_network(cfg)
        if what:
            return what
    return None


def train_counts(cfg: Config) -> list[int] | None:
    """The sample count of every train shard: ``dataset.json``'s, or the synthetic dataset's that
    will be written; None for a dataset not converted yet."""
    root = Path(cfg.data.root)
    if (root / "dataset.json").is_file():
        split = read_dataset_json(root)["splits"].get(cfg.data.train_split, {})
        return [s["count"] for s in split.get("shards", [])] or None
    if cfg.data.source != "synth":
        return None
    n, size = cfg.synth.num_train, cfg.data.shard_size
    return [size] * (n // size) + ([n % size] if n % size else [])


def ranks(job, on_slurm: bool) -> int:
    """A trainer's DDP ranks: nodes x tasks per node in a submitted job, else 1 (an inline run;
    torchrun's ranks are its own command line's)."""
    if not (on_slurm or job.launcher == "local"):
        return 1
    return job.nodes * (job.tasks_per_node or max(job.gpus_per_node, 1))


def data_warnings(name: str, sec: str, job, world: int, counts: list[int]) -> list[str]:
    """The trainer's shares of its training set (``counts``: its shards' samples) at ``world``
    ranks: see the module's docstring."""
    lines, n, b = [], sum(counts), job.batch_size
    step = world * b
    if n < step:
        lines.append(f"{name}: {world} rank(s) x {sec}.batch_size={b} take {step} samples a step, "
                     f"but its training set holds {n}: each rank reads its share again within an "
                     f"epoch; use fewer ranks or a smaller batch")
    elif n - (n // step) * step > 0.05 * n:
        left = n - (n // step) * step
        lines.append(f"{name}: an epoch of {n // step} steps x {world} rank(s) x {sec}.batch_size"
                     f"={b} trains {n - left} of {n} samples; {left} ({100 * left / n:.0f}%) wait "
                     f"for a later epoch (a different few each time); make the training set at "
                     f"least 20 steps of {step}")
    streams = world * max(job.num_workers, 1)
    k = math.ceil(streams / len(counts))
    if k >= 3:
        lines.append(f"{name}: {world} rank(s) x {sec}.num_workers={job.num_workers} = {streams} "
                     f"loader streams on {len(counts)} shards: each shard is split between up to "
                     f"{k} streams, each reading it from its start (about {(k + 1) / 2:.1f}x the "
                     f"data read); write the dataset in shards of at most {max(1, n // streams)} "
                     f"samples (--shard-size), or use fewer workers")
    return lines


def shape_warnings(cfg: Config, stages: list[str], submit: bool = False) -> list[str]:
    """One line per problem of the jobs that ``stages`` run in, each naming the stage and the keys
    to change. ``submit``: every stage is a SLURM job (``psa-dist submit``), whatever the launchers
    say; else only stages whose launcher is slurm are (``psa-dist run`` / ``psa-dist <stage>``:
    inline and torchrun ranks use the machine they are on, local jobs this machine), and only
    those get the GPU and CPU checks; the training set's shares are checked at every shape."""
    lines = []
    gpu_config = cfg.device in ("auto", "cuda")
    counts = train_counts(cfg)
    for name in stages:
        s = table.stage(name)
        if s.kind == "train":
            sec, job = s.section, getattr(cfg, s.section)
            on_slurm = submit or job.launcher == "slurm"
            via = "its psa-dist submit job" if submit else f"{sec}.launcher=slurm"
        elif s.kind == "labels":
            sec, job = "ray", cfg.ray
            on_slurm = submit or (cfg.ray.enabled and cfg.ray.launcher == "slurm")
            via = "its psa-dist submit job" if submit else "ray.launcher=slurm"
        else:       # eval and report: one task on train_seg's kind of node (see submit.job_shape)
            continue
        if s.kind == "train" and counts:
            held = job.holdout_shards if job.stop_patience is not None and name != "train_cls" else 0
            lines += data_warnings(name, sec, job, ranks(job, on_slurm),
                                   counts[:len(counts) - held] or counts)
        if not on_slurm:
            continue
        network = _gpu_network(cfg, s)
        if network and gpu_config and job.gpus_per_node == 0:
            lines.append(
                f"{name} computes with {network}, but {sec}.gpus_per_node=0 ({via}, "
                f"device={cfg.device}): its SLURM job gets no GPU and runs on CPUs"
                + (", one Ray actor per CPU each holding the model"
                   if sec == "ray" and cfg.ray.enabled else "")
                + f"; set {sec}.gpus_per_node, or device=cpu if CPUs are meant")
        if s.kind == "train" and job.num_workers >= job.cpus_per_task:
            lines.append(
                f"{name}: {sec}.num_workers={job.num_workers} loader workers per rank on "
                f"{sec}.cpus_per_task={job.cpus_per_task} CPUs ({via}): with the rank itself they "
                f"outnumber its CPUs; set {sec}.cpus_per_task to at least {job.num_workers + 1}, "
                f"or lower {sec}.num_workers")
    return lines


def warn_shape(cfg: Config, stages: list[str], submit: bool = False) -> list[str]:
    """Print :func:`shape_warnings` to stderr, one ``warning:`` line each; returns them."""
    lines = shape_warnings(cfg, stages, submit)
    for line in lines:
        print(f"psa-dist: warning: {line}", file=sys.stderr, flush=True)
    return lines
