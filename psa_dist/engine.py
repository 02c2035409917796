"""The one training loop shared by the classifier, AffinityNet and segmenter trainers.

SGD with the authors' parameter groups and a poly schedule; one JSON line of metrics every
``log_every`` steps and per epoch; a checkpoint (a plain dict) written atomically at the end of every
epoch and every ``checkpoint_every`` steps; one resume path: a run finding ``checkpoint.pth`` in its
directory continues from it.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .affinity import affinity_loss
from .models import Classifier, set_bn_eval
from .optim import build_optimizer, build_poly_scheduler


def loss_for(kind: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, radius: int = 5):
    """The training loss of each trainer, on one batch."""
    if kind == "cls":
        return Classifier.loss(model(x), y)
    if kind == "aff":
        f = model(x)
        # Labels to the feature grid by nearest neighbour, as the authors' RescaleNearest does.
        lab = F.interpolate(y[:, None].float(), size=f.shape[-2:], mode="nearest")[:, 0].long()
        return affinity_loss(f, lab, radius=radius)
    if kind in ("seg", "seg_full"):
        return F.cross_entropy(model(x), y, ignore_index=255)
    raise ValueError(f"unknown trainer kind {kind!r}")


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    # weights_only: a checkpoint is plain tensors, numbers and strings; never unpickle code.
    return torch.load(path, map_location="cpu", weights_only=True)


class JsonLog:
    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps(record)
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def train(model: nn.Module, kind: str, loader, train_cfg, out_dir: Path, device: torch.device,
          new_modules: list[nn.Module], freeze_bn: bool = False, radius: int = 5,
          is_main: bool = True, ddp_model: nn.Module | None = None, config_dict: dict | None = None):
    """Train ``model`` for ``train_cfg.epochs`` epochs of ``len(loader)`` steps; returns a summary.

    ``ddp_model`` (a DistributedDataParallel wrapper of ``model``) is what the forward pass uses
    when given; checkpoints always hold the bare model's state.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "checkpoint.pth"
    net = ddp_model or model
    steps_per_epoch = len(loader)
    max_steps = train_cfg.epochs * steps_per_epoch
    if freeze_bn:
        set_bn_eval(model)
    opt = build_optimizer(model, train_cfg.lr, train_cfg.weight_decay, train_cfg.momentum, new_modules)
    sched = build_poly_scheduler(opt, max_steps)
    step, start_epoch = 0, 0
    if ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        step, start_epoch = ck["step"], ck["epoch"]
        if is_main:
            print(f"[{kind}] resumed from {ckpt_path} at epoch {start_epoch}, step {step}", flush=True)
    log = JsonLog(out_dir / "log.jsonl", enabled=is_main)
    t_start = time.monotonic()
    images_seen = 0
    for epoch in range(start_epoch, train_cfg.epochs):
        net.train()
        if freeze_bn:
            set_bn_eval(model)
        t0, losses, n_img = time.monotonic(), [], 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = loss_for(kind, net, x, y, radius)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.item())
            n_img += x.shape[0]
            if step % train_cfg.log_every == 0:
                log.write({"kind": kind, "epoch": epoch, "step": step, "of": max_steps,
                           "loss": float(np.mean(losses[-train_cfg.log_every:])),
                           "lr": opt.param_groups[0]["lr"],
                           "images_per_s": n_img / max(time.monotonic() - t0, 1e-9)})
        images_seen += n_img
        dt = time.monotonic() - t0
        remaining = (train_cfg.epochs - epoch - 1) * dt
        log.write({"kind": kind, "epoch": epoch, "step": step, "loss": float(np.mean(losses)),
                   "lr": opt.param_groups[0]["lr"], "images_per_s": n_img / max(dt, 1e-9),
                   "epoch_seconds": round(dt, 2), "eta_seconds": round(remaining, 1)})
        if is_main:
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                        "scheduler": sched.state_dict(), "step": step,
                                        "epoch": epoch + 1, "config": config_dict or {}})
    seconds = time.monotonic() - t_start
    if is_main:
        print(f"[{kind}] done: {train_cfg.epochs} epochs, {step} steps, {images_seen} images in "
              f"{seconds:.0f}s", flush=True)
    return {"steps": step, "seconds": round(seconds, 2), "images": images_seen}
