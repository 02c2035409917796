"""One rank of a training stage: join the process group, build the model and this rank's loader,
run the shared engine. Every launcher ends up here (``submit.py`` picks how the ranks start)."""
from __future__ import annotations

import os
import socket

import torch

from .config import Config, config_to_dict

KINDS = ("cls", "aff", "seg", "seg_full")


def train_config(cfg: Config, kind: str):
    return {"cls": cfg.train_cls, "aff": cfg.train_aff, "seg": cfg.train_seg,
            "seg_full": cfg.train_seg}[kind]


def build_model(run, kind: str):
    from .models import AffinityNet, build_classifier, build_segmenter
    from .pipeline import classifier
    cfg = run.cfg
    if kind == "cls":
        return build_classifier(cfg.model, run.num_classes)
    if kind == "aff":
        return AffinityNet.from_classifier(classifier(run), cfg.model.aff_dims, cfg.model.aff_stride)
    seg = build_segmenter(cfg.model, run.num_classes + 1)
    if cfg.model.seg_from_classifier:
        seg.backbone.load_state_dict(classifier(run).backbone.state_dict())
    return seg


def run_trainer(cfg: Config, kind: str) -> dict:
    """Train ``kind`` on this rank (one of ``WORLD_SIZE``, or alone); returns the engine's summary."""
    from .dist import cleanup, cpu_threads, init_distributed
    from .engine import train
    from .pipeline import Run
    from .train_data import make_train_loader
    if kind not in KINDS:
        raise ValueError(f"unknown trainer {kind!r} (have {KINDS})")
    info = init_distributed(cfg.device)
    threads_before = torch.get_num_threads()
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    print(f"[{kind}] rank {info.rank}/{info.world_size} on node {node}, device {info.device}",
          flush=True)   # one line per rank; after this only rank 0 speaks
    try:
        run = Run(cfg)
        tcfg = train_config(cfg, kind)
        if info.device.type == "cpu":
            torch.set_num_threads(cpu_threads(tcfg.num_workers, tcfg.threads))
            if info.is_main:
                print(f"[{kind}] {torch.get_num_threads()} intra-op thread(s) per rank, "
                      f"{tcfg.num_workers} loader worker(s)", flush=True)
        torch.manual_seed(cfg.seed)      # the same initial weights on every rank
        if info.is_main and kind != "aff" and not cfg.model.pretrained:
            print(f"[{kind}] backbone {cfg.model.backbone}: no pretrained weights (model.pretrained "
                  f"unset), training from random initialisation", flush=True)
        model = build_model(run, kind).to(info.device)
        labels = {"aff": "aff_labels", "seg": "rw"}.get(kind)
        label_urls = [run.out / labels / s.name for s in run.train_shards] if labels else None
        loader = make_train_loader(kind, run.train_shards, label_urls, run.num_classes, tcfg,
                                   run.num_train, rank=info.rank, world_size=info.world_size,
                                   seed=cfg.seed, pin_memory=info.device.type == "cuda")
        return train(model, kind, loader, tcfg, run.out / kind, info, model.new_modules(),
                     freeze_bn=cfg.model.freeze_bn, radius=cfg.random_walk.radius,
                     config_dict=config_to_dict(cfg))
    finally:
        cleanup()
        # an inline trainer runs in the pipeline's own process: later stages get its threads back
        torch.set_num_threads(threads_before)
