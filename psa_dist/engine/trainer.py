"""One trainer from its parts: SGD (or AdamW) with the authors' parameter groups and a poly
schedule (or the learned schedule of a trainer that stops when it has learned; either times a
linear warm-up where asked), DDP across ranks
(``util/dist.py``), the precision the caller chose, the loop and its hooks, and the one resume
path: a trainer finding ``checkpoint.pth`` in its directory continues from it, the loader skipping
the batches the epoch already trained on. Since the loader's batches are a pure function of
(seed, epoch, rank, worker), a run stopped at any point and resumed ends with the weights of an
uninterrupted run (on deterministic kernels; tested on CPU), having redone at most
``checkpoint_every`` steps.

Epochs are counted from 1 in everything a trainer writes out (log lines, ``log.jsonl``,
``best.pth``, its summary); the checkpoint's ``epoch`` is the number of epochs finished, and the
stopping rules' states, kept in the checkpoint, index epochs from 0.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..nets.models import set_bn_eval
from ..nets.optim import LearnedSchedule, build_optimizer, build_poly_scheduler, with_warmup
from ..util.dist import DistInfo, wrap_ddp
from ..util.precision import Precision
from .hooks import Checkpointer, LossLog, StopWhenLearned, TensorBoard, set_rng_state
from .loop import LossFn, TrainLoop
from .stopping import FitRule, StopRule

# a trainer's files in its directory (stages/run_dir.RunDir names them by model from these)
CHECKPOINT, LOG, BEST = "checkpoint.pth", "log.jsonl", "best.pth"


def train(model: nn.Module, losses: Callable[[bool], LossFn], loader, tcfg, out_dir: Path,
          info: DistInfo, *, name: str, section: str, precision: Precision,
          new_modules: list[nn.Module], checkpoint: dict | None = None, freeze_bn: bool = False,
          static: dict | None = None, panels: Callable | None = None, heldout=None,
          label_prior=None, hooks: tuple = (), uniform_lr: bool = False) -> dict:
    """Train ``model`` (already on ``info.device``) for ``tcfg.epochs`` epochs of ``len(loader)``
    steps on every rank; returns rank 0's summary. ``losses(class_terms)``: the loss callable
    (with ``class_terms``, the loss of each class, which the fit rule follows class by class).
    ``name`` and ``section``: the model's name in log lines and its config section in advice.
    ``checkpoint``: the directory's checkpoint, read by the caller (it chose ``precision`` with
    it). ``static``: entries every checkpoint keeps (config, settings). ``panels``: with
    ``tcfg.tensorboard``, rank 0's panel drawer (TensorBoard). ``heldout``: a loader of held-out
    weak labels: ``tcfg.epochs`` is then a cap, training stops by :class:`StopRule` and ends with
    the weights of its best epoch. ``label_prior``: the classifier's prior loss of each class,
    with ``tcfg.fit_target``: ``epochs`` is a cap and training stops by :class:`FitRule`.
    ``hooks``: more hooks, acting after the built-in ones and before the checkpoint.
    ``uniform_lr``: one learning rate for every trainable parameter (``build_optimizer``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / CHECKPOINT
    if freeze_bn:   # before DDP: it registers only the parameters that require grad
        set_bn_eval(model)
    if tcfg.channels_last:      # before DDP, so that its buckets see the weights' layout
        model.to(memory_format=torch.channels_last)
    net = wrap_ddp(model, info)
    max_steps = tcfg.epochs * len(loader)
    scaler = torch.amp.GradScaler("cuda", enabled=precision.dtype is torch.float16)
    opt = build_optimizer(model, tcfg.lr, tcfg.weight_decay, tcfg.momentum, new_modules,
                          uniform=uniform_lr, kind=tcfg.optimizer)
    warmup = math.ceil(tcfg.warmup_epochs * len(loader))     # any warm-up asked: a step at least
    stop_state = (checkpoint or {}).get("stop") or {}
    fitting = tcfg.fit_target is not None
    if fitting and label_prior is None:
        raise ValueError(f"{section}.fit_target needs the labels' prior loss (label_prior)")
    class_terms = fitting and tcfg.fit_each_class     # the loss of each class, tracked
    learned = (LearnedSchedule(max_steps, tcfg.stop_decay, state=stop_state.get("lr"))
               if heldout is not None or fitting else None)
    sched = (torch.optim.lr_scheduler.LambdaLR(opt, with_warmup(learned, warmup))
             if learned is not None else build_poly_scheduler(opt, max_steps, warmup_steps=warmup))
    loop = TrainLoop(model, net, losses(class_terms), loader, opt, sched, scaler, precision.dtype,
                     info.device, tcfg.epochs, [], freeze_bn,
                     torch.channels_last if tcfg.channels_last else None)
    static = {"config": {}, **(static or {}),
              "precision": {**precision.record(), "device": info.device.type}}
    loop.hooks = _hooks(out_dir, info, tcfg, name, section, static, panels, learned, stop_state,
                        (heldout, losses(False)) if heldout is not None else None, label_prior,
                        class_terms)
    loop.hooks[-1:-1] = list(hooks)
    if checkpoint is not None:
        ck = checkpoint
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        loop.step, loop.start_epoch, loop.skip = ck["step"], ck["epoch"], ck["step_in_epoch"]
        for h in loop.hooks:
            h.resume(ck)
        set_rng_state(ck["rng"])
        if info.is_main:
            print(f"[{name}] resumed from {ckpt_path} in epoch {loop.start_epoch + 1}, at step "
                  f"{loop.step}", flush=True)

    t_start = time.monotonic()
    loop.run()
    log = loop.hook(LossLog)
    seconds = time.monotonic() - t_start
    stop = loop.hook(StopWhenLearned)
    best = stop.stopper.state["best_epoch"] if stop and stop.stopper else None
    if info.is_main:
        print(f"[{name}] done: {loop.step // max(loop.steps_per_epoch, 1)} epochs, {loop.step} "
              f"steps, {log.images_seen} images in {seconds:.0f}s on {info.world_size} rank(s)" +
              (f"; the weights of epoch {best + 1}, the best on held-out labels"
               if best is not None else ""), flush=True)
    summary = {"steps": loop.step, "seconds": round(seconds, 2), "images": log.images_seen,
               "world_size": info.world_size, "precision": precision.record()}
    for h in loop.hooks:
        summary.update(h.summary())
    return summary


def _hooks(out_dir: Path, info: DistInfo, tcfg, name: str, section: str, static: dict, panels,
           learned, stop_state: dict, heldout, label_prior, class_terms: bool) -> list:
    """The hooks in the order they act: the loss log, TensorBoard (rank 0, where asked), the
    stopping rules (with a learned schedule), the checkpoint last (it keeps what they decided)."""
    tensorboard = (TensorBoard(out_dir / "tensorboard", name, panels)
                   if panels is not None and info.is_main else None)
    log = LossLog(name, section, out_dir / LOG, out_dir / CHECKPOINT, info,
                  tcfg.log_every, len(label_prior) if class_terms else 0, learned,
                  sinks=[tensorboard.scalars] if tensorboard else [])
    hooks = [log] + ([tensorboard] if tensorboard else [])
    if learned is not None:
        stopper = (StopRule(tcfg.stop_patience, tcfg.stop_min_delta, stop_state.get("rule"))
                   if heldout is not None else None)
        fit = (FitRule(tcfg.fit_target, tcfg.fit_window,
                       float(torch.as_tensor(label_prior, dtype=torch.float64).mean()),
                       stop_state.get("fit"),
                       class_prior=[float(p) for p in label_prior] if class_terms else None)
               if tcfg.fit_target is not None else None)
        hooks.append(StopWhenLearned(name, tcfg, info, learned, log, out_dir / BEST,
                                     stopper, heldout, fit))
    hooks.append(Checkpointer(out_dir / CHECKPOINT, info, tcfg.checkpoint_every, name,
                              section, static))
    return hooks
