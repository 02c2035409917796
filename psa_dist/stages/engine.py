"""The one training loop shared by the classifier, AffinityNet and segmenter trainers.

SGD with the authors' parameter groups and a poly schedule, DDP across ranks (``util/dist.py``),
AMP (bf16/fp16 on CUDA; on a CPU bf16 where timing the model's step says it is faster,
``util/precision.py``);
one JSON line of metrics every ``log_every`` steps and per epoch, from rank 0 only; a checkpoint
written atomically by rank 0 every ``checkpoint_every`` steps and at every epoch end. A checkpoint
is a plain dict (model, optimizer, scheduler, grad scaler, epoch, step, step in epoch, RNG states,
config; ``nets/checkpoint.py``) and there is one resume path: a run finding ``checkpoint.pth`` in
its directory continues from it, the loader skipping the batches the epoch already trained on.
Since the loader's batches are a pure function of (seed, epoch, rank, worker), a run stopped at any
point and resumed ends with the weights of an uninterrupted run (on deterministic kernels; tested
on CPU), having redone at most ``checkpoint_every`` steps. ``kind`` is the model's name in the
stage table (``cls``, ``aff``, ``seg``, ``seg_full``). Epochs are counted from 1 in everything a
trainer writes out (log lines, ``log.jsonl``, ``best.pth``, its summary); the checkpoint's
``epoch`` is the number of epochs finished, and the stopping rules' states, kept in the
checkpoint, index epochs from 0.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.affinity import affinity_loss
from ..nets.checkpoint import load_checkpoint, save_checkpoint
from ..nets.models import Classifier, set_bn_eval
from ..nets.optim import LearnedSchedule, build_optimizer, build_poly_scheduler
from ..util.dist import DistInfo, all_reduce_sum, barrier, broadcast_object, wrap_ddp
from ..util.precision import Precision, amp_dtype, autocast, choose_for_model
from . import table
from .stopping import FitRule, StopRule


def loss_for(kind: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, radius: int = 5,
             border: str = "all", class_terms: bool = False):
    """The training loss of each trainer, on one batch. Under autocast the network runs in the low
    precision; its outputs are cast back to float32 so that every loss is taken in full precision.
    AffinityNet's labels come on its feature grid already (the loader crops them on the cells,
    ``data/train_data.Augment``); ``border``: which pairs of the crop count (``affinity_loss``).
    ``class_terms`` (the classifier): the loss of each class, whose mean is the loss."""
    if kind == "cls":
        logits = model(x).float()
        return Classifier.class_losses(logits, y) if class_terms else Classifier.loss(logits, y)
    if kind == "aff":
        f = model(x).float()
        if f.shape[-2:] != y.shape[-2:]:
            raise ValueError(f"AffinityNet's features are {tuple(f.shape[-2:])} cells, its labels "
                             f"{tuple(y.shape[-2:])}: model.aff_stride and the labels' stride differ")
        return affinity_loss(f, y, radius=radius, border=border)
    if kind in ("seg", "seg_full"):
        return F.cross_entropy(model(x).float(), y, ignore_index=255)
    raise ValueError(f"unknown trainer kind {kind!r}")


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


def train_step(net: nn.Module, kind: str, x, y, opt, sched, scaler, dtype, radius: int = 5,
               border: str = "all", class_terms: bool = False):
    """One optimisation step on one batch; returns the (detached) loss, or with ``class_terms``
    the classifier's loss of each class (their mean is the loss it stepped on)."""
    with autocast(x.device, dtype):
        terms = loss_for(kind, net, x, y, radius, border, class_terms)
    loss = terms.mean()
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    sched.step()
    return terms.detach()


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or infinite: the trainer stops rather than train on it."""


def check_finite(loss: float, kind: str, epoch: int, step: int, section: str, ckpt: Path,
                 what: str | None = None) -> None:
    """Raise :class:`TrainingDiverged` for a non-finite ``loss`` in epoch ``epoch`` (counted from
    1) at global step ``step`` (as MAE and DINO stop). Called on
    values summed over every rank, so all ranks stop at the same step."""
    if math.isfinite(loss):
        return
    raise TrainingDiverged(
        f"[{kind}] {what or f'the training loss is {loss}'} at epoch {epoch}, step {step}: "
        f"training diverged and stops ({ckpt} holds only weights from before). Lower "
        f"{section}.lr, set {section}.amp=none, or, when training from random weights, set "
        f"model.freeze_bn=false (frozen BN keeps the initial statistics, so nothing normalises), "
        f"then rerun the stage with --force")


@torch.no_grad()
def heldout_loss(model: nn.Module, kind: str, loader, device, dtype, radius: int = 5,
                 border: str = "all") -> float:
    """The training loss of ``model`` over a held-out loader (the same draws every time), summed
    over every rank's share."""
    was = model.training
    model.eval()
    loader.set_epoch(0, 0)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, dtype):
            loss = loss_for(kind, model, x, y, radius, border)
        total += torch.stack([loss.double() * x.shape[0], total.new_tensor(float(x.shape[0]))])
    model.train(was)
    total = all_reduce_sum(total)
    return float(total[0] / total[1].clamp(min=1))


def _counted(epoch: int | None) -> int | None:
    """A rule's epoch index (from 0) as the epoch number written out (from 1)."""
    return None if epoch is None else epoch + 1


def _rng_state() -> dict:
    # Only torch's generators: the loader draws from its own seeded generators (train_data.py),
    # and a checkpoint must load with weights_only (tensors, no numpy or pickled objects).
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _precision(model: nn.Module, kind: str, train_cfg, info: DistInfo, field: str,
               ck: dict | None) -> Precision:
    """The step's precision: a resumed run on the same kind of device keeps its checkpoint's (so
    that it ends with the weights of an uninterrupted run, whatever a new timing would say); else
    rank 0 decides (on a CPU by timing the model's own step, ``util/precision.py``) and every rank
    takes its decision: one precision across the job, whatever each node would time."""
    amp_dtype(train_cfg.amp, info.device, field)   # a bad setting fails every rank, not rank 0
    kept = (ck or {}).get("precision")
    if (kept is not None and info.device.type == "cpu" == kept.get("device")
            and train_cfg.amp == "bf16"):
        precision = Precision(torch.bfloat16 if kept["dtype"] == "bfloat16" else None,
                              kept["reason"], kept.get("float32_s"), kept.get("bf16_s"),
                              kept.get("cached", False), resumed=True)
    elif info.is_main:
        crop = train_cfg.crop_size or 256
        # both segmenters are one architecture: one timing (and one cache entry) serves both
        precision = choose_for_model(train_cfg.amp, info.device, field, model,
                                     (train_cfg.batch_size, 3, crop, crop), train=True,
                                     key="seg" if kind == "seg_full" else kind)
    else:
        precision = None
    precision = broadcast_object(precision)
    if info.is_main:
        print(f"[{kind}] precision: {precision.describe()} on {info.device.type}", flush=True)
    return precision


def train(model: nn.Module, kind: str, loader, train_cfg, out_dir: Path, info: DistInfo,
          new_modules: list[nn.Module], freeze_bn: bool = False, radius: int = 5,
          config_dict: dict | None = None, tensorboard=None, heldout=None,
          label_prior: float | None = None, settings: dict | None = None) -> dict:
    """Train ``model`` (already on ``info.device``) for ``train_cfg.epochs`` epochs of
    ``len(loader)`` steps on every rank; returns a summary. Checkpoints hold the bare model.
    ``tensorboard``: rank 0's :class:`~psa_dist.stages.tensorboard.TensorBoardLog`, or None.
    ``heldout``: a loader of held-out weak labels; with it, ``train_cfg.epochs`` is a cap, training
    stops by :class:`StopRule` (``train_cfg.stop_patience``, ``stop_min_delta``) and ends with
    the weights of its best epoch (``best.pth``). ``label_prior``: the classifier's
    :meth:`~psa_dist.nets.models.Classifier.prior_losses` on its training labels (one per
    class), with ``train_cfg.fit_target``: then ``epochs`` is a cap and training stops by
    :class:`FitRule` (class by class with ``train_cfg.fit_each_class``). ``settings``: what
    decides the stage's outputs (``table.settings``), kept in the checkpoint so that a rerun under
    other settings is refused before it resumes (``train.check_resumable``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "checkpoint.pth"
    if freeze_bn:   # before DDP: it registers only the parameters that require grad
        set_bn_eval(model)
    net = wrap_ddp(model, info)
    steps_per_epoch = len(loader)
    max_steps = train_cfg.epochs * steps_per_epoch
    section = table.MODELS[kind].section
    field = section + ".amp"
    ck = load_checkpoint(ckpt_path) if ckpt_path.is_file() else None
    precision = _precision(model, kind, train_cfg, info, field, ck)
    dtype = precision.dtype
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
    opt = build_optimizer(model, train_cfg.lr, train_cfg.weight_decay, train_cfg.momentum, new_modules)
    step, epoch0, skip, stop_state, partial_loss = 0, 0, 0, None, None
    if ck is not None:
        stop_state = ck.get("stop")
    fitting = train_cfg.fit_target is not None
    if fitting and label_prior is None:
        raise ValueError(f"{section}.fit_target needs the labels' prior loss (label_prior)")
    class_terms = fitting and train_cfg.fit_each_class     # the loss of each class, tracked
    width = 2 + (len(label_prior) if class_terms else 0)   # sum, count[, each class's sum]
    learned = (LearnedSchedule(max_steps, train_cfg.stop_decay, state=(stop_state or {}).get("lr"))
               if heldout is not None or fitting else None)
    sched = (torch.optim.lr_scheduler.LambdaLR(opt, learned) if learned is not None
             else build_poly_scheduler(opt, max_steps))
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        step, epoch0, skip = ck["step"], ck["epoch"], ck["step_in_epoch"]
        partial_loss = ck.get("epoch_loss")
        _set_rng_state(ck["rng"])
        if info.is_main:
            print(f"[{kind}] resumed from {ckpt_path} in epoch {epoch0 + 1}, at step {step}",
                  flush=True)

    stopper = (StopRule(train_cfg.stop_patience, train_cfg.stop_min_delta,
                        (stop_state or {}).get("rule")) if heldout is not None else None)
    fit = (FitRule(train_cfg.fit_target, train_cfg.fit_window,
                   float(torch.as_tensor(label_prior, dtype=torch.float64).mean()),
                   (stop_state or {}).get("fit"),
                   class_prior=[float(p) for p in label_prior] if class_terms else None)
           if fitting else None)

    def loss_row(terms: torch.Tensor) -> torch.Tensor:
        # one step's entry of the running sums: its loss, 1[, each class's loss]
        head = torch.stack([terms.double().mean(), terms.new_ones((), dtype=torch.float64)])
        return torch.cat([head, terms.double().reshape(-1)]) if class_terms else head
    best_path = out_dir / "best.pth"

    def save(epoch: int, step_in_epoch: int, epoch_loss: torch.Tensor | None = None) -> None:
        # epoch_loss: within an epoch, its loss so far summed over every rank, so that a resumed
        # epoch ends with the loss (and the stopping decision) of an uninterrupted one
        # a step's loss is taken before its update: the weights it leaves are checked here, on
        # every rank together, so that no checkpoint holds NaN or infinite weights or statistics
        bad = sum(int(not torch.isfinite(t).all()) for t in model.state_dict().values()
                  if t.is_floating_point())                   # BN's running statistics too
        bad = float(all_reduce_sum(torch.tensor([float(bad)], device=info.device))[0])
        # epoch: the epochs finished; mid-epoch (step_in_epoch > 0) the one under way is the next
        check_finite(float("nan") if bad else 0.0, kind, epoch + (step_in_epoch > 0), step,
                     section, ckpt_path,
                     what="the weights are no longer finite")
        if info.is_main:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "step": step,
                "epoch": epoch, "step_in_epoch": step_in_epoch, "rng": _rng_state(),
                **({"epoch_loss": epoch_loss.cpu()} if epoch_loss is not None else {}),
                "config": config_dict or {}, "world_size": info.world_size,
                "precision": {**precision.record(), "device": info.device.type},
                **({"settings": settings} if settings is not None else {}),
                **({"stop": {"rule": stopper.state if stopper else None,
                             "fit": fit.state if fit else None, "lr": learned.state}}
                   if learned is not None else {})})

    json_log = JsonLog(out_dir / "log.jsonl", enabled=info.is_main)

    def eta(step: int, seconds_per_step: float) -> dict:
        # A trainer that stops when learned runs to the cap until its rule fires: its ETA is then
        # an upper bound ("eta_to": "cap"); once the decay has started, the last step is known.
        last, to = max_steps, "end"
        if learned is not None:
            start, length = learned.window()
            last, to = start + length, ("end" if learned.state["decay_from"] is not None else "cap")
        return {"eta_seconds": round((last - step) * seconds_per_step, 1), "eta_to": to}

    def log(record: dict) -> None:
        json_log.write(record)
        if tensorboard is not None:
            tensorboard.scalars(record)

    t_start, images_seen = time.monotonic(), 0
    for epoch in range(epoch0, train_cfg.epochs):
        net.train()
        if freeze_bn:
            set_bn_eval(model)
        loader.set_epoch(epoch, skip)
        k = skip
        t0 = t_log = time.monotonic()
        ep_loss = torch.zeros(width, dtype=torch.float64, device=info.device)
        if (skip and partial_loss is not None and info.is_main
                and partial_loss.numel() == width):          # the resumed epoch's first part
            ep_loss += partial_loss.to(info.device)
        win_loss = torch.zeros(width, dtype=torch.float64, device=info.device)
        n_img = n_win = 0
        for x, y in loader:
            x = x.to(info.device, non_blocking=True)
            y = y.to(info.device, non_blocking=True)
            terms = train_step(net, kind, x, y, opt, sched, scaler, dtype, radius,
                               train_cfg.pair_border, class_terms)
            step, k = step + 1, k + 1
            win_loss += loss_row(terms)
            n_img, n_win = n_img + x.shape[0], n_win + x.shape[0]
            if step % train_cfg.log_every == 0:
                ep_loss += win_loss
                mean = all_reduce_sum(win_loss)
                check_finite(float(mean[0]), kind, epoch + 1, step, section, ckpt_path)
                now = time.monotonic()
                log({"kind": kind, "epoch": epoch + 1, "step": step, "of": max_steps,
                     "loss": float(mean[0] / mean[1]), "lr": opt.param_groups[0]["lr"],
                     "images_per_s": round(n_win * info.world_size / max(now - t_log, 1e-9), 2),
                     **eta(step, (now - t0) / max(k - skip, 1))})
                win_loss.zero_()
                t_log, n_win = now, 0
            if step % train_cfg.checkpoint_every == 0 and k < steps_per_epoch:
                save(epoch, k, all_reduce_sum(ep_loss + win_loss))
        ep_loss += win_loss
        ep_loss = all_reduce_sum(ep_loss)
        check_finite(float(ep_loss[0]), kind, epoch + 1, step, section, ckpt_path)
        images_seen += n_img * info.world_size
        dt = time.monotonic() - t0
        ep_mean = float(ep_loss[0] / ep_loss[1].clamp(min=1))
        class_mean = (ep_loss[2:] / ep_loss[1].clamp(min=1)).tolist() if class_terms else None
        log({"kind": kind, "epoch": epoch + 1, "step": step, "loss": ep_mean,
             **({"class_loss": [round(v, 5) for v in class_mean]} if class_terms else {}),
             "lr": opt.param_groups[0]["lr"],
             "images_per_s": round(n_img * info.world_size / max(dt, 1e-9), 2),
             "epoch_seconds": round(dt, 2), **eta(step, dt / max(k - skip, 1))})
        if tensorboard is not None and n_img:     # panels of the epoch's last batch
            tensorboard.panels(epoch + 1, model, x, y)
        skip = 0
        if stopper is not None:
            h = heldout_loss(model, kind, heldout, info.device, dtype, radius, train_cfg.pair_border)
            if stopper.update(epoch, h) and info.is_main:
                save_checkpoint(best_path, {"model": model.state_dict(), "epoch": epoch + 1})
            log({"kind": kind, "epoch": epoch + 1, "step": step, "heldout_loss": h,
                 "best_epoch": stopper.state["best_epoch"] + 1})
            if stopper.stop:
                decay = learned.start_decay(step, steps_per_epoch)
                if decay and info.is_main:
                    print(f"[{kind}] learned after epoch {epoch + 1}: the held-out loss is no "
                          f"better than epoch {stopper.state['ref_epoch'] + 1}'s for "
                          f"{train_cfg.stop_patience} epochs; the learning rate decays over "
                          f"{decay // steps_per_epoch} more epoch(s), then training stops",
                          flush=True)
        if fit is not None and fit.update(epoch, ep_mean, class_mean):
            decay = learned.start_decay(step, steps_per_epoch)
            if decay and info.is_main:
                ratios = [r for r in fit.class_ratios() or [] if r is not None]
                what = (f"each class's training loss of the last {fit.window} epoch(s) is at most "
                        f"{train_cfg.fit_target} x its prior loss (the hardest class at "
                        f"{max(ratios):.2f} x)" if ratios else
                        f"the training loss of the last {fit.window} epoch(s) is at most "
                        f"{train_cfg.fit_target} x the labels' prior loss "
                        f"{fit.state['prior']:.4f}")
                print(f"[{kind}] fit after epoch {epoch + 1}: {what}; the learning rate decays "
                      f"over {decay // steps_per_epoch} more epoch(s), then training stops",
                      flush=True)
        save(epoch + 1, 0)
        if learned is not None and learned.finished(step):
            break
    if stopper is not None and stopper.state["best_epoch"] is not None:
        barrier()                 # rank 0 wrote best.pth
        model.load_state_dict(load_checkpoint(best_path)["model"])
        save(train_cfg.epochs, 0)  # the best weights, marked finished: a rerun does not train
    seconds = time.monotonic() - t_start
    if tensorboard is not None:
        tensorboard.close()
    epochs = step // max(steps_per_epoch, 1)
    if info.is_main:
        print(f"[{kind}] done: {epochs} epochs, {step} steps, {images_seen} images in "
              f"{seconds:.0f}s on {info.world_size} rank(s)" +
              (f"; the weights of epoch {stopper.state['best_epoch'] + 1}, the best on held-out labels"
               if stopper is not None else ""), flush=True)
    summary = {"steps": step, "seconds": round(seconds, 2), "images": images_seen,
               "world_size": info.world_size, "precision": precision.record()}
    if stopper is not None:
        curve = stopper.state["curve"]
        summary.update({"epochs_run": curve[-1][0] + 1 if curve else 0,
                        "best_epoch": _counted(stopper.state["best_epoch"]),
                        "heldout_loss": [round(v, 5) for _, v in curve]})
    if fit is not None:
        curve = fit.state["curve"]
        summary.update({"epochs_run": curve[-1][0] + 1 if curve else 0,
                        "fit_epoch": _counted(fit.state["fit_epoch"]),
                        "prior_loss": round(fit.state["prior"], 5),
                        "train_loss": [round(v, 5) for _, v in curve]})
        if "class_prior" in fit.state:
            summary.update({"class_prior_loss": [round(v, 5) for v in fit.state["class_prior"]],
                            "class_train_loss": [[round(v, 5) for v in c]
                                                 for _, c in fit.state["class_curve"]]})
    return summary
