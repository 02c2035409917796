"""The training stages: one rank of a trainer (join the process group, build the model and this
rank's loader, run the training loop of ``engine/`` with its kind's loss), and the thin launcher that decides where the ranks run.

``train_*.launcher`` (per trainer, in the config or ``--launcher`` on the command line): ``inline``
(this process), ``torchrun`` (this process is one of torchrun's ranks), ``local`` or ``slurm`` (a
submitit job, :mod:`psa_dist.cluster.launch`). A submitted trainer is a
:class:`~psa_dist.cluster.launch.Job` of :func:`run_trainer`: every rank calls it, and on
preemption or timeout (SLURM's USR2) it requeues itself; the requeued ranks resume from the last
checkpoint the engine wrote. The caller waits, prints the trainer's JSON log lines as they appear, and gets the rank-0
summary, or the job's error.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import socket
import time

import torch

from ..cluster.launch import Job, check_launcher, follow_job, make_executor
from ..config import Config, ConfigError
from ..data.shards import decode_sample, iter_shard, split_shards
from ..data.train_data import make_train_loader
from ..engine.trainer import train
from ..nets.checkpoint import load_checkpoint
from ..nets.models import Classifier, set_bn_eval
from ..util.dist import DistInfo, broadcast_object, cleanup, cpu_threads, init_distributed
from ..util.precision import Precision, amp_dtype, choose_for_model
from . import table
from .model_factory import model_to_train
from .run_dir import Run, RunDir


def _shard_sets(run: Run, model: str, tcfg):
    """(training, held-out) lists of (shard, label shard or None, samples): with
    ``stop_patience``, the classifier holds out the val split's image labels and the other models
    the last ``holdout_shards`` train shards (their affinity / pseudo labels, or the masks for the
    fully supervised segmenter); without it, everything trains and nothing is held out."""
    labels = table.labels_of(run.cfg, model)
    counts = [s["count"] for s in run.info["splits"][run.cfg.data.train_split]["shards"]]
    train = list(zip(run.train_shards, run.label_shards(labels) if labels else
                     [None] * len(counts), counts))
    if tcfg.stop_patience is None:
        return train, []
    if table.kind(model).heldout_split:       # the classifier: the val split's image labels
        val = run.cfg.data.val_split
        info = run.info["splits"][val]
        shards = split_shards(run.root, val, run.info, run.cfg.data.shard_url)
        return train, [(s, None, c["count"]) for s, c in zip(shards, info["shards"])]
    k = tcfg.holdout_shards
    if k >= len(train):
        section = table.MODELS[model].section
        raise ValueError(f"{section}.holdout_shards={k}: the train split has {len(train)} shards; "
                         f"hold out fewer, or write the dataset in smaller shards")
    return train[:-k], train[-k:]


def _loader(model, shards, tcfg, run, rank, world_size, pin_memory, num_samples=None,
            finite=False):
    labels = [lab for _, lab, _ in shards]
    kind = table.kind(model)
    return make_train_loader(kind.target, [s for s, _, _ in shards], labels if labels[0] else None,
                             run.num_classes, tcfg, [c for _, _, c in shards], rank=rank,
                             world_size=world_size, seed=run.cfg.seed, pin_memory=pin_memory,
                             label_stride=kind.label_stride(run.cfg), num_samples=num_samples,
                             finite=finite)


def train_loader(run: Run, model: str, tcfg, num_samples: int | None = None, rank: int = 0,
                 world_size: int = 1, pin_memory: bool = False):
    """This rank's loader for ``model``: its training shards, joined with the label stage's shards
    the model trains on (affinity labels, pseudo labels) where it has one."""
    train, _ = _shard_sets(run, model, tcfg)
    return _loader(model, train, tcfg, run, rank, world_size, pin_memory, num_samples)


def heldout_loader(run: Run, model: str, tcfg, rank: int = 0, world_size: int = 1):
    """This rank's share of ``model``'s held-out weak labels (None without ``stop_patience``):
    every held-out sample on exactly one rank, once (at 64 ranks too), with the same augmentation
    draws every time it is read, no loader workers."""
    _, held = _shard_sets(run, model, tcfg)
    if not held:
        return None
    return _loader(model, held, dataclasses.replace(tcfg, num_workers=0), run, rank, world_size,
                   False, finite=True)


def label_frequency(run: Run, model: str, tcfg) -> torch.Tensor:
    """The share of ``model``'s training images that have each class: its training shards'
    image labels (only ``cls.json`` is decoded)."""
    counts, n = torch.zeros(run.num_classes, dtype=torch.float64), 0
    for shard, _, _ in _shard_sets(run, model, tcfg)[0]:
        for raw in iter_shard(shard):
            classes = decode_sample(raw, ("cls",))["cls"]
            counts[torch.tensor(sorted(set(classes)), dtype=torch.long) - 1] += 1
            n += 1
    if n == 0:
        raise ValueError(f"{table.MODELS[model].section}.fit_target: the training shards hold "
                         f"no images")
    return counts / n


def choose_precision(model: torch.nn.Module, name: str, tcfg, info: DistInfo,
                     ck: dict | None) -> Precision:
    """The step's precision: a resumed run on the same kind of device keeps its checkpoint's (so
    that it ends with the weights of an uninterrupted run, whatever a new timing would say); else
    rank 0 decides (on a CPU by timing the model's own step, ``util/precision.py``) and every rank
    takes its decision: one precision across the job, whatever each node would time."""
    field = f"{table.MODELS[name].section}.amp"
    amp_dtype(tcfg.amp, info.device, field)   # a bad setting fails every rank, not rank 0
    kept = (ck or {}).get("precision")
    if (kept is not None and info.device.type == "cpu" == kept.get("device")
            and tcfg.amp == "bf16"):
        precision = Precision(torch.bfloat16 if kept["dtype"] == "bfloat16" else None,
                              kept["reason"], kept.get("float32_s"), kept.get("bf16_s"),
                              kept.get("cached", False), resumed=True)
    elif info.is_main:
        if tcfg.channels_last:      # timed as it will train (the trainer converts it anyway)
            model.to(memory_format=torch.channels_last)
        crop = tcfg.crop_size or 256
        precision = choose_for_model(tcfg.amp, info.device, field, model,
                                     (tcfg.batch_size, 3, crop, crop), train=True,
                                     key=table.kind(name).timing_key)
    else:
        precision = None
    precision = broadcast_object(precision)
    if info.is_main:
        print(f"[{name}] precision: {precision.describe()} on {info.device.type}", flush=True)
    return precision


def _say_start(cfg: Config, model: str) -> None:
    kind = table.kind(model)
    source = kind.initial_weights(cfg)
    print(f"[{model}] starting from {source}" if source else
          f"[{model}] no pretrained weights ({kind.random_init_key(cfg)} unset): "
          f"training from random initialisation", flush=True)
    if cfg.model.freeze_bn and not kind.starts_pretrained(cfg):
        print(f"[{model}] warning: model.freeze_bn with random weights keeps BN at its "
              f"initial statistics (mean 0, variance 1), so nothing normalises the "
              f"activations and training may diverge: set model.freeze_bn=false", flush=True)


def run_trainer(cfg: Config, model: str) -> dict:
    """Train ``model`` on this rank (one of ``WORLD_SIZE``, or alone); returns the engine's
    summary."""
    tcfg = table.train_config(cfg, model)
    kind = table.kind(model)
    info = init_distributed(cfg.device)
    failed = True
    threads_before = torch.get_num_threads()
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    print(f"[{model}] rank {info.rank}/{info.world_size} on node {node}, device {info.device}",
          flush=True)   # one line per rank; after this only rank 0 speaks
    try:
        if info.world_size > 1 or tcfg.launcher == "torchrun":
            # here, after the ranks met, rank 0 has cleared what a forced stage redoes: every
            # rank sees the same checkpoint (launch_training checks before ranks exist)
            check_resumable(cfg, model)
        run = Run(cfg)
        if info.device.type == "cpu":
            torch.set_num_threads(cpu_threads(tcfg.num_workers, tcfg.threads))
            if info.is_main:
                print(f"[{model}] {torch.get_num_threads()} intra-op thread(s) per rank, "
                      f"{tcfg.num_workers} loader worker(s)", flush=True)
        torch.manual_seed(cfg.seed)      # the same initial weights on every rank
        if info.is_main:
            _say_start(cfg, model)
        net = model_to_train(run, model).to(info.device)
        loader = train_loader(run, model, tcfg, rank=info.rank, world_size=info.world_size,
                              pin_memory=info.device.type == "cuda")
        held = heldout_loader(run, model, tcfg, rank=info.rank, world_size=info.world_size)
        prior = (Classifier.prior_losses(label_frequency(run, model, tcfg))
                 if tcfg.fit_target is not None else None)   # every rank reads the same labels
        out, ckpt = run.model_dir(model), run.checkpoint(model)
        ck = load_checkpoint(ckpt) if ckpt.is_file() else None
        if cfg.model.freeze_bn:      # timed as it trains: frozen BN trains fewer parameters
            set_bn_eval(net)
        precision = choose_precision(net, model, tcfg, info, ck)
        palette = run.info["palette"]
        summary = train(
            net, kind.losses(cfg, tcfg), loader, tcfg, out, info, name=model,
            section=table.MODELS[model].section, precision=precision,
            new_modules=net.new_modules(), checkpoint=ck, freeze_bn=cfg.model.freeze_bn,
            static={"config": dataclasses.asdict(cfg),
                    "settings": table.settings(cfg, table.MODELS[model].stage)},
            panels=((lambda m, x, y: kind.panels(m, x, y, palette)) if tcfg.tensorboard
                    else None),
            heldout=held, label_prior=prior, uniform_lr=kind.uniform_lr)
        failed = False
        return summary
    finally:
        cleanup(failed)
        # an inline trainer runs in the pipeline's own process: later stages get its threads back
        torch.set_num_threads(threads_before)


class SettingsChanged(ConfigError):
    """A stage's checkpoint was trained under other settings than the config's now."""


def check_resumable(cfg: Config, model: str) -> None:
    """Refuse to resume ``model``'s checkpoint when it was trained under other settings (the keys
    that decide the stage's outputs, ``table.settings``; where and how fast it runs may change):
    it would mix two configs in one model, and the stage's marker would record only the second.
    Checkpoints from before settings were kept resume as they are."""
    m = table.MODELS[model]
    ckpt = RunDir(cfg.out_dir).checkpoint(model)
    recorded = load_checkpoint(ckpt).get("settings") if ckpt.is_file() else None
    if recorded is None:
        return
    now = table.settings(cfg, m.stage)
    diff = table.changed_settings(recorded, now)
    if diff:
        cli = table.stage(m.stage).cli
        raise SettingsChanged(
            f"{ckpt}: this stage's checkpoint was trained with other settings ("
            f"{', '.join(f'{k}: {recorded.get(k)!r} -> {now.get(k)!r}' for k in diff)}); set "
            f"them back to resume it, or train it again with these: psa-dist run CONFIG --from "
            f"{cli} (or psa-dist {cli} CONFIG --force)")


def launch_training(cfg: Config, model: str) -> dict:
    """Train ``model`` with its configured launcher and return the rank-0 summary; a checkpoint
    of it is resumed only under the settings it was trained with (:func:`check_resumable`)."""
    tcfg = table.train_config(cfg, model)
    launcher = tcfg.launcher
    if launcher != "torchrun":     # this process is the only driver: check before any rank runs
        check_resumable(cfg, model)
    if not check_launcher(f"{table.MODELS[model].section}.launcher", launcher):
        return run_trainer(cfg, model)        # this process is the rank (or the only one)
    run = RunDir(cfg.out_dir)
    out = run.model_dir(model)
    # A folder per submission: SLURM job ids restart on a fresh cluster, and submitit would read an
    # old job's result pickle from a reused folder.
    folder = out / "submitit" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    ex = make_executor(tcfg, launcher, folder, f"psa-{cfg.name}-{model}")
    job = ex.submit(Job(functools.partial(run_trainer, cfg, model)))
    print(f"[{model}] submitted {launcher} job {job.job_id} ({tcfg.nodes} node(s) x "
          f"{tcfg.tasks_per_node or max(tcfg.gpus_per_node, 1)} task(s)); logs in {folder}",
          flush=True)
    return follow_job(job, run.train_log(model))


def run_train_stage(run: Run, stage: str) -> dict:
    """Train every model of ``stage``: the summary of its one model, or one per model (train_seg
    with seg_full: ``{"seg": ..., "seg_full": ...}``)."""
    models = table.models_trained(run.cfg, stage)
    if len(table.stage(stage).models) == 1:
        return launch_training(run.cfg, models[0])
    return {m: launch_training(run.cfg, m) for m in models}
