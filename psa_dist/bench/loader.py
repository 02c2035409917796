"""``bench loader``: the training loader's samples/s from shards (decode + augment, with the
configured workers) against the samples/s a training step consumes on batches already in memory.
The loader is not the bottleneck when the ratio is well above 1.
"""
from __future__ import annotations

import json
import time

import torch

from ..config import Config
from ..nets.optim import build_optimizer, build_poly_scheduler
from ..stages import table
from ..engine.loop import train_step
from ..stages.model_factory import model_to_train
from ..stages.run_dir import Run
from ..stages.train import train_loader
from ..util.dist import DistInfo
from ..util.precision import choose_for_model


def _rate(n: int, seconds: float) -> float:
    return n / max(seconds, 1e-9)


def bench_loader(cfg: Config, kind: str = "cls", batches: int = 30, workers: int | None = None) -> dict:
    run = Run(cfg)
    tcfg = table.train_config(cfg, kind)
    if workers is not None:
        tcfg.num_workers = workers
    loader = train_loader(run, kind, tcfg, max(run.num_train, batches * tcfg.batch_size))
    it = iter(loader)
    held = [next(it)]                      # first batch: worker start-up, not counted
    t0 = time.monotonic()
    for _ in range(batches - 1):
        held.append(next(it))
    load_s = time.monotonic() - t0
    n_loaded = sum(b[0].shape[0] for b in held[1:])
    info = DistInfo(device=run.device)
    torch.manual_seed(cfg.seed)
    model = model_to_train(run, kind).to(run.device).train()
    opt = build_optimizer(model, tcfg.lr, tcfg.weight_decay, tcfg.momentum, model.new_modules(),
                          kind=tcfg.optimizer)
    sched = build_poly_scheduler(opt, len(held) * 2)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    crop = tcfg.crop_size or 256       # the precision the trainer would choose (timed on a CPU)
    dtype = choose_for_model(tcfg.amp, info.device, f"{table.MODELS[kind].section}.amp", model,
                             (tcfg.batch_size, 3, crop, crop), train=True,
                             key=table.kind(kind).timing_key).dtype
    loss = table.kind(kind).losses(cfg, tcfg)(False)
    x, y = held[0]
    train_step(model, loss, x.to(run.device), y.to(run.device), opt, sched, scaler, dtype)  # warm-up
    t0 = time.monotonic()
    for x, y in held[1:]:
        train_step(model, loss, x.to(run.device), y.to(run.device), opt, sched, scaler, dtype)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.monotonic() - t0
    res = {"bench": "loader", "kind": kind, "workers": tcfg.num_workers,
           "batch_size": tcfg.batch_size, "device": str(run.device),
           "threads": torch.get_num_threads(),
           "loader_samples_per_s": round(_rate(n_loaded, load_s), 1),
           "train_samples_per_s": round(_rate(n_loaded, train_s), 1)}
    res["ratio"] = round(res["loader_samples_per_s"] / max(res["train_samples_per_s"], 1e-9), 2)
    print(f"[bench loader] {kind}: loader {res['loader_samples_per_s']} samples/s with "
          f"{res['workers']} worker(s); a training step consumes {res['train_samples_per_s']} "
          f"samples/s on {res['device']}: loader/training = {res['ratio']}x", flush=True)
    out = run.bench
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"loader_{kind}.json", "w") as f:
        json.dump(res, f, indent=1)
    return res
