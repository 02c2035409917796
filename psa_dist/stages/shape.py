"""The job shape a config asks for, checked against the work each stage does in it: warnings (not
errors) that ``psa-dist run`` and ``psa-dist submit`` print before anything runs or is submitted.

Two mistakes cost a cluster run hours without failing it, so they are said at once:

* a stage that computes with a GPU-sized network (ResNet-38 / ResNet-50 backbones, the
  DeepLabV3-ResNet50 segmenter) gets a SLURM job without a GPU while the config means to use one
  (``device`` auto or cuda): it then runs on the job's CPUs, days instead of hours, or one Ray actor
  per CPU each holding the model;
* a trainer's loader workers (``num_workers``) are as many as its CPUs (``cpus_per_task``) or more:
  with the rank's own process they share too few cores and slow each other down.

Which network a stage uses, and which config section gives its job, come from the stage table.
"""
from __future__ import annotations

import sys

from ..config import Config
from . import table

GPU_BACKBONES = ("resnet38", "resnet50")
GPU_SEGMENTERS = ("deeplabv3_resnet50",)


def _gpu_network(cfg: Config, stage: table.Stage) -> str | None:
    """The GPU-sized network the stage trains or loads, in words, or None (none, or a small one)."""
    backbone = cfg.model.backbone
    for model in (*stage.models, *stage.uses_models):
        if model in ("seg", "seg_full"):
            if cfg.model.segmenter in GPU_SEGMENTERS:
                return f"model.segmenter={cfg.model.segmenter}"
            if backbone in GPU_BACKBONES:     # the light segmenter is built on the backbone
                return f"the {cfg.model.segmenter} segmenter on model.backbone={backbone}"
        elif backbone in GPU_BACKBONES:
            what = "classifier" if model == "cls" else "AffinityNet"
            return f"the {what} on model.backbone={backbone}"
    return None


def shape_warnings(cfg: Config, stages: list[str], submit: bool = False) -> list[str]:
    """One line per problem of the jobs that ``stages`` run in, each naming the stage and the keys
    to change. ``submit``: every stage is a SLURM job (``psa-dist submit``), whatever the launchers
    say; else only stages whose launcher is slurm are (``psa-dist run`` / ``psa-dist <stage>``:
    inline and torchrun ranks use the machine they are on, local jobs this machine)."""
    lines = []
    gpu_config = cfg.device in ("auto", "cuda")
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
