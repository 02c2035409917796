"""The training loop a reader can hold in their head: epochs of steps, and hooks called around them
(detectron2's ``train_loop.py`` is the model). A step runs the loss callable under autocast and
takes one optimiser step; everything else a trainer does (log lines, finite checks, checkpoints,
stopping rules, TensorBoard) is a :class:`Hook` in ``hooks.py``. The loop knows no stage or model.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from ..nets.models import set_bn_eval
from ..util.precision import autocast

# loss_fn(network, images, targets) -> the loss, or the loss of each class (its mean is the loss)
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def train_step(net: nn.Module, loss_fn: LossFn, x, y, opt, sched, scaler, dtype) -> torch.Tensor:
    """One optimisation step on one batch; returns what ``loss_fn`` returned, detached (the loss,
    or the loss of each class whose mean it stepped on)."""
    with autocast(x.device, dtype):
        terms = loss_fn(net, x, y)
    loss = terms.mean()
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    sched.step()
    return terms.detach()


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or infinite: the trainer stops rather than train on it."""


def check_finite(loss: float, name: str, epoch: int, step: int, section: str, ckpt,
                 what: str | None = None) -> None:
    """Raise :class:`TrainingDiverged` for a non-finite ``loss`` in epoch ``epoch`` (counted from
    1) at global step ``step`` (as MAE and DINO stop). Called on values summed over every rank,
    so all ranks stop at the same step. ``section``: the trainer's config section, for the
    advice."""
    if math.isfinite(loss):
        return
    raise TrainingDiverged(
        f"[{name}] {what or f'the training loss is {loss}'} at epoch {epoch}, step {step}: "
        f"training diverged and stops ({ckpt} holds only weights from before). Lower "
        f"{section}.lr, set {section}.amp=none, or, when training from random weights, set "
        f"model.freeze_bn=false (frozen BN keeps the initial statistics, so nothing normalises), "
        f"then rerun the stage with --force")


class Hook:
    """Something done around the loop's steps and epochs. ``loop`` exposes the model, the step
    counters, the epoch under way (``epoch``, from 0), the last batch (``x``, ``y``) and what the
    loss callable returned for it (``terms``). A hook that keeps state across a restart puts it in
    the checkpoint (:meth:`checkpoint_entries`) and takes it back (:meth:`resume`)."""

    def before_train(self, loop: "TrainLoop") -> None: ...
    def before_epoch(self, loop: "TrainLoop") -> None: ...
    def after_step(self, loop: "TrainLoop") -> None: ...
    def after_epoch(self, loop: "TrainLoop") -> None: ...
    def after_train(self, loop: "TrainLoop") -> None: ...

    def checkpoint_entries(self, loop: "TrainLoop", mid_epoch: bool) -> dict:
        return {}

    def resume(self, checkpoint: dict) -> None: ...

    def summary(self) -> dict:
        return {}


class TrainLoop:
    """``epochs`` epochs of ``len(loader)`` steps from ``start_epoch`` (skipping the first ``skip``
    batches of it: a resumed epoch), then the hooks' ``after_train``. A hook ends training early
    by setting ``stop``; the epoch finishes first."""

    def __init__(self, model: nn.Module, net: nn.Module, loss_fn: LossFn, loader, opt, sched,
                 scaler, dtype, device, epochs: int, hooks: list[Hook], freeze_bn: bool = False,
                 memory_format: torch.memory_format | None = None):
        self.model, self.net, self.loss_fn, self.loader = model, net, loss_fn, loader
        self.opt, self.sched, self.scaler, self.dtype = opt, sched, scaler, dtype
        self.device, self.epochs, self.hooks, self.freeze_bn = device, epochs, hooks, freeze_bn
        self.memory_format = memory_format      # of the image batches (channels-last), or None
        self.steps_per_epoch, self.max_steps = len(loader), epochs * len(loader)
        self.step, self.start_epoch, self.skip = 0, 0, 0
        self.epoch, self.step_in_epoch, self.images = 0, 0, 0    # images: this rank's, this epoch
        self.x = self.y = self.terms = None
        self.stop = False

    def hook(self, kind: type) -> Hook | None:
        return next((h for h in self.hooks if isinstance(h, kind)), None)

    def _call(self, event: str) -> None:
        for h in self.hooks:
            getattr(h, event)(self)

    def run(self) -> None:
        self._call("before_train")
        for epoch in range(self.start_epoch, self.epochs):
            self.epoch, self.step_in_epoch, self.images = epoch, self.skip, 0
            self.net.train()
            if self.freeze_bn:        # BN keeps its statistics (the authors' setting)
                set_bn_eval(self.model)
            self.loader.set_epoch(epoch, self.skip)
            self._call("before_epoch")
            for x, y in self.loader:
                self.x = x.to(self.device, non_blocking=True)
                if self.memory_format is not None and self.x.dim() == 4:
                    self.x = self.x.contiguous(memory_format=self.memory_format)
                self.y = y.to(self.device, non_blocking=True)
                self.terms = train_step(self.net, self.loss_fn, self.x, self.y, self.opt,
                                        self.sched, self.scaler, self.dtype)
                self.step, self.step_in_epoch = self.step + 1, self.step_in_epoch + 1
                self.images += self.x.shape[0]
                self._call("after_step")
            self._call("after_epoch")
            self.skip = 0
            if self.stop:
                break
        self._call("after_train")
