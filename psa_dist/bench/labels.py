"""`psa-dist bench cams` and `psa-dist bench scaling`: the label stages against their own limits.

``bench cams``: the CAM stage end to end on one shard (read, decode, multi-scale + flip inference,
encode, write) against the same model's bare forward passes on the same images already decoded in
memory. The ratio is the share of the compute rate the stage keeps: I/O overlapped when near 1.

``bench scaling``: one label stage on Ray with 1, 2, ... actors (one intra-op thread each) over the
same shards; then the per-shard scheduling overhead and the driver's memory on runs of many tiny
shards (the COCO regime: many shards, many actors).

Both build what they need in a scratch directory (a small synthetic dataset, a randomly initialised
classifier: speed does not depend on the weights), so they run on a fresh checkout.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..cluster.shard_pool import ensure_ray
from ..config import Config
from ..core.cam import cam_multiscale_batch
from ..core.image import normalize
from ..data.shards import decode_sample, iter_shard, output_path, split_shards
from ..data.synth import write_synth
from ..nets.checkpoint import save_checkpoint
from ..nets.models import build_classifier
from ..stages.label_pool import label_pool
from ..stages.label_stages.cams import cam_shard, timing_shape
from ..stages.run_dir import Run, RunDir
from ..util.precision import autocast, choose_for_model


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _scratch_run(cfg: Config, root: Path, num_train: int, shard_size: int, image_size: int):
    """A synthetic dataset of ``num_train`` images in shards of ``shard_size``, and a run
    directory holding a randomly initialised classifier checkpoint: its train shards, and the
    config of that run (``data.root`` and ``out_dir`` in ``root``)."""

    synth = dataclasses.replace(cfg.synth, num_train=num_train, num_val=1, image_size=image_size)
    write_synth(synth, root / "data", shard_size=shard_size, workers=1, progress=False)
    out = root / "run"
    torch.manual_seed(0)
    model = build_classifier(cfg.model, synth.num_classes)
    save_checkpoint(RunDir(out).checkpoint("cls"), {"model": model.state_dict()})
    run_cfg = copy.deepcopy(cfg)
    run_cfg.synth, run_cfg.data.root, run_cfg.out_dir = synth, str(root / "data"), str(out)
    return split_shards(root / "data", "train"), run_cfg


def bench_cams(cfg: Config, images: int = 48, out_dir: str | Path | None = None) -> dict:
    """Stage images/s against bare-forward images/s on one shard of ``images`` images."""
    c = cfg.cams
    with tempfile.TemporaryDirectory() as tmp:
        shards, run_cfg = _scratch_run(cfg, Path(tmp), images, images, cfg.synth.image_size)
        num_classes = run_cfg.synth.num_classes
        model = build_classifier(cfg.model, num_classes).eval()
        # the precision the CAM stage would choose on this CPU (timed as its workers time it)
        amp = choose_for_model(c.amp, "cpu", "cams.amp", model, timing_shape(cfg),
                               train=False, key="cams").dtype
        samples = [decode_sample(s, ("image", "cls")) for s in iter_shard(shards[0])]
        batches = []
        for i in range(0, len(samples), c.batch_size):
            group = samples[i:i + c.batch_size]
            hot = torch.zeros(len(group), num_classes)
            for j, s in enumerate(group):
                hot[j, torch.tensor(s["cls"]) - 1] = 1
            batches.append((normalize(torch.from_numpy(np.stack([s["image"] for s in group]))), hot))
        with autocast("cpu", amp):
            cam_multiscale_batch(model, *batches[0], tuple(c.scales), c.flip)    # warm-up
        bare, stage, summary = [], [], {}
        for rep in range(4):      # alternate, keep the best of each: the machine's noise hits both
            t0 = time.perf_counter()
            for x, hot in batches:
                with autocast("cpu", amp):
                    cam_multiscale_batch(model, x, hot, tuple(c.scales), c.flip)
            bare.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            summary = cam_shard(model, str(shards[0]), str(Path(tmp) / f"cams{rep}.tar"), num_classes,
                                tuple(c.scales), c.flip, "cpu", c.batch_size, amp)
            stage.append(time.perf_counter() - t0)
    res = {"bench": "cams", "images": len(samples), "image_size": cfg.synth.image_size,
           "scales": list(c.scales), "flip": c.flip, "batch_size": c.batch_size,
           "threads": torch.get_num_threads(), "precision": str(amp or torch.float32),
           "bare_images_per_s": round(len(samples) / min(bare), 2),
           "stage_images_per_s": round(len(samples) / min(stage), 2),
           "read_wait_seconds": summary.get("read_wait_seconds"),
           "write_seconds": summary.get("write_seconds")}
    res["ratio"] = round(res["stage_images_per_s"] / res["bare_images_per_s"], 3)
    print(f"[bench cams] stage {res['stage_images_per_s']} img/s end to end (read, decode, "
          f"{len(c.scales)} scales{' + flip' if c.flip else ''}, write) vs bare forward "
          f"{res['bare_images_per_s']} img/s on the same images in memory: {100 * res['ratio']:.1f}% "
          f"(read wait {res['read_wait_seconds']} s, write {res['write_seconds']} s)", flush=True)
    _save(out_dir or cfg.out_dir, "cams", res)
    return res


def _run_stage(cfg: Config, stage: str, shards: list, actors: int,
               counts=None) -> tuple[float, dict]:
    """``stage`` of the scratch run ``cfg`` over ``shards`` on ``actors`` Ray actors, its outputs
    removed first; (seconds, summary)."""
    run = Run(cfg, prepare=False)
    shutil.rmtree(run.stage_dir(stage), ignore_errors=True)
    run.stage_dir(stage).mkdir(parents=True)
    log = run.shard_log(f"{stage}.{actors}")
    log.unlink(missing_ok=True)
    tasks = [(s, output_path(run.stage_dir(stage), s)) for s in shards]
    t0 = time.perf_counter()
    summary = label_pool(run, stage, actors, log_path=log).run(tasks, counts)
    return time.perf_counter() - t0, summary


def bench_scaling(cfg: Config, actors=(1, 2), images: int = 96, shards_per_run: int = 8,
                  tiny_shards=(250, 1000, 2000), out_dir: str | Path | None = None) -> dict:
    """Ray label generation with 1, 2, ... actors on the same shards, and the per-shard overhead and
    driver memory on many tiny shards."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    res = {"bench": "scaling", "stage": "cams", "cpus": os.cpu_count(), "rows": [], "tiny": []}
    with tempfile.TemporaryDirectory() as tmp:
        ensure_ray(cfg.ray, max(actors))
        try:
            # Actor start-up (process, imports, model load) is paid once per stage; measure it on
            # one tiny shard per actor so that the speed-up below is the steady state's.
            tiny_cfg = _tiny_cams(cfg)
            tshards, tiny_run = _scratch_run(tiny_cfg, Path(tmp) / "b", max(tiny_shards), 1, 32)
            startup = {n: _run_stage(tiny_run, "cams", tshards[:n], n)[0] for n in actors}
            shards, run_cfg = _scratch_run(cfg, Path(tmp) / "a", images, images // shards_per_run,
                                           cfg.synth.image_size)
            counts = {str(s): images // shards_per_run for s in shards}
            base = None
            for n in actors:
                wall, summary = _run_stage(run_cfg, "cams", shards, n, counts)
                steady = max(wall - startup[n], 1e-9)
                base = base or steady
                row = {"actors": n, "seconds": round(wall, 2), "startup_seconds": round(startup[n], 2),
                       "images_per_s": round(images / steady, 2),
                       "speedup": round(base / steady, 2), "io_wait_share": summary["io_wait_share"]}
                res["rows"].append(row)
                print(f"[bench scaling] {n} actor(s): {row['images_per_s']} img/s after a start-up "
                      f"of {row['startup_seconds']} s, {row['speedup']}x one actor (I/O wait "
                      f"{100 * row['io_wait_share']:.1f}%)", flush=True)
            # Many tiny shards (one 32-px image each, at one scale): the time is scheduling.
            n = max(actors)
            for count in tiny_shards:
                rss0 = _rss_mb()
                wall, summary = _run_stage(tiny_run, "cams", tshards[:count], n)
                busy = sum(json.loads(line)["seconds"] for line in
                           open(RunDir(tiny_run.out_dir).shard_log(f"cams.{n}")))
                steady = max(wall - startup[n], 1e-9)
                row = {"shards": count, "actors": n, "seconds": round(wall, 2),
                       "shards_per_s": round(count / steady, 1),
                       # time per shard per actor beyond the worker's own, start-up excluded
                       "overhead_ms_per_shard": round(1000 * (steady * n - busy) / count, 2),
                       "driver_rss_growth_mb": round(_rss_mb() - rss0, 1)}
                res["tiny"].append(row)
                print(f"[bench scaling] {count} tiny shards on {max(actors)} actors: "
                      f"{row['shards_per_s']} shards/s, scheduling overhead "
                      f"{row['overhead_ms_per_shard']} ms/shard, driver memory "
                      f"{row['driver_rss_growth_mb']:+.1f} MB", flush=True)
        finally:
            ray.shutdown()
    _save(out_dir or cfg.out_dir, "scaling", res)
    return res


def _tiny_cams(cfg: Config) -> Config:
    tiny = copy.deepcopy(cfg)
    tiny.cams.scales, tiny.cams.flip = [1.0], False
    tiny.synth.min_objects = tiny.synth.max_objects = 1
    return tiny


def _save(out_dir, name: str, res: dict) -> None:
    out = Path(out_dir) / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=1))
