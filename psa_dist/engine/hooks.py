"""What a trainer does around its steps, one hook each (``loop.Hook``): :class:`LossLog` (the loss
summed over every rank, its finite checks, one JSON line every ``log_every`` steps and per epoch,
from rank 0), :class:`TensorBoard` (its scalars and image panels), :class:`StopWhenLearned` (the
held-out and fit rules of ``stopping.py`` and the learned schedule they start) and
:class:`Checkpointer` (the checkpoint, written atomically by rank 0 every ``checkpoint_every``
steps and at every epoch end, after every rank checked the weights are finite). Their order in the
trainer's list is the order they act in.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..nets.checkpoint import load_checkpoint, save_checkpoint
from ..util.dist import DistInfo, all_reduce_sum, barrier
from ..util.precision import autocast
from .loop import Hook, LossFn, TrainLoop, check_finite
from .stopping import FitRule, StopRule


def _rng_state() -> dict:
    # Only torch's generators: the loader draws from its own seeded generators (train_data.py),
    # and a checkpoint must load with weights_only (tensors, no numpy or pickled objects).
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


class LossLog(Hook):
    """Running sums of the loss (and of each class's, ``class_terms``) over a log window and over
    the epoch; at each log line and epoch end they are summed over every rank, checked finite (all
    ranks stop at the same step) and written: printed and appended to ``log.jsonl`` by rank 0,
    and handed to ``sinks`` (TensorBoard). ``learned``: the learned schedule, whose window bounds
    the ETA ("eta_to": "cap" until its decay has started)."""

    def __init__(self, name: str, section: str, path: Path, ckpt: Path, info: DistInfo,
                 log_every: int, class_terms: int, learned=None, sinks: tuple = ()):
        self.name, self.section, self.path, self.ckpt, self.info = name, section, path, ckpt, info
        self.log_every, self.learned, self.sinks = log_every, learned, list(sinks)
        self.class_terms, self.width = class_terms, 2 + class_terms   # sum, count[, per class]
        self.partial = None            # a resumed epoch's loss so far (every rank's, summed)
        self.images_seen, self.epoch_mean, self.class_mean = 0, None, None

    def write(self, record: dict) -> None:
        if self.info.is_main:
            line = json.dumps(record)
            print(line, flush=True)
            with open(self.path, "a") as f:
                f.write(line + "\n")
        for sink in self.sinks:
            sink(record)

    def _row(self, terms: torch.Tensor) -> torch.Tensor:
        # one step's entry of the running sums: its loss, 1[, each class's loss]
        head = torch.stack([terms.double().mean(), terms.new_ones((), dtype=torch.float64)])
        return torch.cat([head, terms.double().reshape(-1)]) if self.class_terms else head

    def _eta(self, loop: TrainLoop, seconds_per_step: float) -> dict:
        # A trainer that stops when learned runs to the cap until its rule fires: its ETA is then
        # an upper bound ("eta_to": "cap"); once the decay has started, the last step is known.
        last, to = loop.max_steps, "end"
        if self.learned is not None:
            start, length = self.learned.window()
            last = start + length
            to = "end" if self.learned.state["decay_from"] is not None else "cap"
        return {"eta_seconds": round((last - loop.step) * seconds_per_step, 1), "eta_to": to}

    def before_epoch(self, loop: TrainLoop) -> None:
        self.t0 = self.t_log = time.monotonic()
        self.epoch_sum = torch.zeros(self.width, dtype=torch.float64, device=self.info.device)
        if (loop.skip and self.partial is not None and self.info.is_main
                and self.partial.numel() == self.width):     # the resumed epoch's first part
            self.epoch_sum += self.partial.to(self.info.device)
        self.window = torch.zeros(self.width, dtype=torch.float64, device=self.info.device)
        self.window_images = 0

    def after_step(self, loop: TrainLoop) -> None:
        self.window += self._row(loop.terms)
        self.window_images += loop.x.shape[0]
        if loop.step % self.log_every:
            return
        self.epoch_sum += self.window
        mean = all_reduce_sum(self.window)
        check_finite(float(mean[0]), self.name, loop.epoch + 1, loop.step, self.section, self.ckpt)
        now = time.monotonic()
        done = max(loop.step_in_epoch - loop.skip, 1)
        self.write({"kind": self.name, "epoch": loop.epoch + 1, "step": loop.step,
                    "of": loop.max_steps, "loss": float(mean[0] / mean[1]),
                    "lr": loop.opt.param_groups[0]["lr"],
                    "images_per_s": round(self.window_images * self.info.world_size
                                          / max(now - self.t_log, 1e-9), 2),
                    **self._eta(loop, (now - self.t0) / done)})
        self.window.zero_()
        self.t_log, self.window_images = now, 0

    def after_epoch(self, loop: TrainLoop) -> None:
        total = all_reduce_sum(self.epoch_sum + self.window)
        check_finite(float(total[0]), self.name, loop.epoch + 1, loop.step, self.section,
                     self.ckpt)
        self.images_seen += loop.images * self.info.world_size
        dt = time.monotonic() - self.t0
        self.epoch_mean = float(total[0] / total[1].clamp(min=1))
        self.class_mean = ((total[2:] / total[1].clamp(min=1)).tolist() if self.class_terms
                           else None)
        self.write({"kind": self.name, "epoch": loop.epoch + 1, "step": loop.step,
                    "loss": self.epoch_mean,
                    **({"class_loss": [round(v, 5) for v in self.class_mean]}
                       if self.class_terms else {}),
                    "lr": loop.opt.param_groups[0]["lr"],
                    "images_per_s": round(loop.images * self.info.world_size / max(dt, 1e-9), 2),
                    "epoch_seconds": round(dt, 2),
                    **self._eta(loop, dt / max(loop.step_in_epoch - loop.skip, 1))})

    def checkpoint_entries(self, loop: TrainLoop, mid_epoch: bool) -> dict:
        # within an epoch, its loss so far summed over every rank, so that a resumed epoch ends
        # with the loss (and the stopping decision) of an uninterrupted one
        if not mid_epoch:
            return {}
        return {"epoch_loss": all_reduce_sum(self.epoch_sum + self.window).cpu()}

    def resume(self, checkpoint: dict) -> None:
        self.partial = checkpoint.get("epoch_loss")


class TensorBoard(Hook):
    """Rank 0's TensorBoard log (``<model dir>/tensorboard``): the scalars of the log lines and,
    every epoch, image panels of the epoch's last batch drawn by ``panels(model, x, y)`` (a uint8
    (N, H, W, 3) array, one row of panels per image)."""

    def __init__(self, log_dir: Path, name: str, panels: Callable):
        from torch.utils.tensorboard import SummaryWriter
        self.writer, self.name, self.panels = SummaryWriter(str(log_dir)), name, panels

    def scalars(self, record: dict) -> None:
        step = record["step"]
        for name in ("loss", "lr", "images_per_s", "heldout_loss"):
            if name in record:
                tag = "epoch_loss" if name == "loss" and "epoch_seconds" in record else name
                self.writer.add_scalar(f"{self.name}/{tag}", record[name], step)
        for c, value in enumerate(record.get("class_loss", []), start=1):   # class ids from 1
            self.writer.add_scalar(f"{self.name}/class_loss/{c}", value, step)

    @torch.no_grad()
    def after_epoch(self, loop: TrainLoop) -> None:
        if not loop.images:
            return
        was = loop.model.training
        loop.model.eval()
        rows = self.panels(loop.model, loop.x, loop.y)
        loop.model.train(was)
        batch = torch.from_numpy(np.stack(rows)).permute(0, 3, 1, 2)
        self.writer.add_images(f"{self.name}/panels", batch, loop.epoch + 1, dataformats="NCHW")
        self.writer.flush()

    def after_train(self, loop: TrainLoop) -> None:
        self.writer.close()


@torch.no_grad()
def heldout_loss(model, loss_fn: LossFn, loader, device, dtype) -> float:
    """The training loss of ``model`` over a held-out loader (the same draws every time), summed
    over every rank's share."""
    was = model.training
    model.eval()
    loader.set_epoch(0, 0)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, dtype):
            loss = loss_fn(model, x, y)
        total += torch.stack([loss.double() * x.shape[0], total.new_tensor(float(x.shape[0]))])
    model.train(was)
    total = all_reduce_sum(total)
    return float(total[0] / total[1].clamp(min=1))


def _counted(epoch: int | None) -> int | None:
    """A rule's epoch index (from 0) as the epoch number written out (from 1)."""
    return None if epoch is None else epoch + 1


class StopWhenLearned(Hook):
    """``epochs`` as a cap: after each epoch the held-out rule (``stopper`` on ``heldout``, a
    (loader, loss callable) pair; the best epoch's weights kept in ``best.pth`` and restored at
    the end) and the fit rule (``fit``, on :class:`LossLog`'s epoch loss) may start the learned
    schedule's decay; training stops when it has run out."""

    def __init__(self, name: str, tcfg, info: DistInfo, learned, log: LossLog, best: Path,
                 stopper: StopRule | None = None, heldout: tuple | None = None,
                 fit: FitRule | None = None):
        self.name, self.tcfg, self.info, self.learned, self.log = name, tcfg, info, learned, log
        self.best, self.stopper, self.heldout, self.fit = best, stopper, heldout, fit

    def _say(self, text: str) -> None:
        if self.info.is_main:
            print(f"[{self.name}] {text}", flush=True)

    def after_epoch(self, loop: TrainLoop) -> None:
        epoch, per_epoch = loop.epoch, loop.steps_per_epoch
        if self.stopper is not None:
            loader, loss_fn = self.heldout
            h = heldout_loss(loop.model, loss_fn, loader, self.info.device, loop.dtype)
            if self.stopper.update(epoch, h) and self.info.is_main:
                save_checkpoint(self.best, {"model": loop.model.state_dict(), "epoch": epoch + 1})
            self.log.write({"kind": self.name, "epoch": epoch + 1, "step": loop.step,
                            "heldout_loss": h,
                            "best_epoch": self.stopper.state["best_epoch"] + 1})
            decay = self.stopper.stop and self.learned.start_decay(loop.step, per_epoch)
            if decay:
                self._say(f"learned after epoch {epoch + 1}: the held-out loss is no better "
                          f"than epoch {self.stopper.state['ref_epoch'] + 1}'s for "
                          f"{self.tcfg.stop_patience} epochs; the learning rate decays over "
                          f"{decay // per_epoch} more epoch(s), then training stops")
        if self.fit is not None and self.fit.update(epoch, self.log.epoch_mean,
                                                    self.log.class_mean):
            decay = self.learned.start_decay(loop.step, per_epoch)
            if decay:
                ratios = [r for r in self.fit.class_ratios() or [] if r is not None]
                what = (f"each class's training loss of the last {self.fit.window} epoch(s) is "
                        f"at most {self.tcfg.fit_target} x its prior loss (the hardest class at "
                        f"{max(ratios):.2f} x)" if ratios else
                        f"the training loss of the last {self.fit.window} epoch(s) is at most "
                        f"{self.tcfg.fit_target} x the labels' prior loss "
                        f"{self.fit.state['prior']:.4f}")
                self._say(f"fit after epoch {epoch + 1}: {what}; the learning rate decays over "
                          f"{decay // per_epoch} more epoch(s), then training stops")
        loop.stop = self.learned.finished(loop.step)

    def checkpoint_entries(self, loop: TrainLoop, mid_epoch: bool) -> dict:
        return {"stop": {"rule": self.stopper.state if self.stopper else None,
                         "fit": self.fit.state if self.fit else None, "lr": self.learned.state}}

    def after_train(self, loop: TrainLoop) -> None:
        if self.stopper is None or self.stopper.state["best_epoch"] is None:
            return
        barrier()                 # rank 0 wrote best.pth
        loop.model.load_state_dict(load_checkpoint(self.best)["model"])
        # the best weights, marked finished: a rerun does not train
        loop.hook(Checkpointer).save(loop, loop.epochs, 0)

    def summary(self) -> dict:
        out = {}
        if self.stopper is not None:
            curve = self.stopper.state["curve"]
            out.update({"epochs_run": curve[-1][0] + 1 if curve else 0,
                        "best_epoch": _counted(self.stopper.state["best_epoch"]),
                        "heldout_loss": [round(v, 5) for _, v in curve]})
        if self.fit is not None:
            st, curve = self.fit.state, self.fit.state["curve"]
            out.update({"epochs_run": curve[-1][0] + 1 if curve else 0,
                        "fit_epoch": _counted(st["fit_epoch"]), "prior_loss": round(st["prior"], 5),
                        "train_loss": [round(v, 5) for _, v in curve]})
            if "class_prior" in st:
                out.update({"class_prior_loss": [round(v, 5) for v in st["class_prior"]],
                            "class_train_loss": [[round(v, 5) for v in c]
                                                 for _, c in st["class_curve"]]})
        return out


class Checkpointer(Hook):
    """``checkpoint.pth``, a plain dict (model, optimizer, scheduler, grad scaler, epoch, step,
    step in epoch, RNG states, ``static`` entries such as the config and precision, and what each
    hook keeps), every ``every`` steps within an epoch and at its end. Every rank first checks the
    weights it leaves (BN statistics too) are finite, together, so that no checkpoint holds NaN or
    infinite weights; rank 0 writes it atomically."""

    def __init__(self, path: Path, info: DistInfo, every: int, name: str, section: str,
                 static: dict):
        self.path, self.info, self.every, self.name = path, info, every, name
        self.section, self.static = section, static

    def after_step(self, loop: TrainLoop) -> None:
        if loop.step % self.every == 0 and loop.step_in_epoch < loop.steps_per_epoch:
            self.save(loop, loop.epoch, loop.step_in_epoch)

    def after_epoch(self, loop: TrainLoop) -> None:
        self.save(loop, loop.epoch + 1, 0)

    def save(self, loop: TrainLoop, epoch: int, step_in_epoch: int) -> None:
        """``epoch``: the epochs finished; mid-epoch (``step_in_epoch`` > 0) the one under way is
        the next."""
        entries = {}
        for h in loop.hooks:
            entries.update(h.checkpoint_entries(loop, step_in_epoch > 0))
        model = loop.model
        bad = sum(int(not torch.isfinite(t).all()) for t in model.state_dict().values()
                  if t.is_floating_point())
        bad = float(all_reduce_sum(torch.tensor([float(bad)], device=self.info.device))[0])
        check_finite(float("nan") if bad else 0.0, self.name, epoch + (step_in_epoch > 0),
                     loop.step, self.section, self.path, what="the weights are no longer finite")
        if self.info.is_main:
            save_checkpoint(self.path, {
                "model": model.state_dict(), "optimizer": loop.opt.state_dict(),
                "scheduler": loop.sched.state_dict(), "scaler": loop.scaler.state_dict(),
                "step": loop.step, "epoch": epoch, "step_in_epoch": step_in_epoch,
                "rng": _rng_state(), "world_size": self.info.world_size, **self.static,
                **entries})
