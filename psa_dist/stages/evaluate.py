"""The eval stage (mIoU of every stage) on the shard scheduler: every shard scored
(``evaluate_shard.py``) by an :class:`EvalWorker` of a
:class:`~psa_dist.cluster.shard_pool.ShardPool` (Ray actors with ``ray.enabled``, else this
process: the same pool as the label stages, ``labels.run_pool``), each shard's partial result
written atomically to a small JSON file, and the figures summed from those files at the end.
Also here: scoring PNG predictions against a split's masks (``psa-dist predict``).

Parts: ``<out>/stages/eval_parts/<what>/<shard>.<fingerprint>.json``, ``what`` one of
``labels`` (one part per train shard: the CAMs, the affinity labels, the walk's labels and the
perfect walk; CPU work) and each segmenter (``seg``, ``seg_full``: one part per val shard, the model
on a GPU actor where there is one). A rerun skips the parts that exist, so an eval stopped after
hours resumes at its first missing shard. The fingerprint is a digest of what the part was
computed from (the label shards' or the checkpoint's size and mtime, the scoring settings):
a part of older inputs (say, the walk redone) has another name, and is removed before the run,
while the parts whose inputs did not change are kept (train-seg redone rescored only the
segmenter).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..cluster.ray_job import AtAddress, in_own_job, submit_ray_job
from ..config import Config
from ..core.metrics import ConfusionMatrix, lost_objects
from ..data.shards import decode_sample, iter_joined, output_path, shard_basename, split_shards
from ..util.atomic import atomic_write_json
# eval_label_shards and perfect_walk_label: imported from here by `psa-dist label` and the tests
from . import table
from .evaluate_shard import (REGION_FIGURES, eval_label_shards, label_figures,  # noqa: F401
                             label_result, perfect_walk_label, print_results, score_label_shard,
                             score_segmenter_shard, segmenter_result)
from .label_pool import run_pool
from .run_dir import Run, worker_device
from .model_factory import load_trained

SEGMENTERS = ("seg", "seg_full")


class EvalWorker:
    """Scores shards into part files: ``what`` is "labels" (every label figure of a train shard)
    or a segmenter, which it loads once (on ``device``)."""

    def __init__(self, what: str, cfg: Config, device: str = "cpu", threads: int = 1):
        torch.set_num_threads(threads)
        self.what, self.cfg = what, cfg
        self.run = Run(cfg, prepare=False)      # the driver made the dataset; read it only
        self.device = worker_device(device)
        self.model = load_trained(self.run, what, self.device) if what in SEGMENTERS else None

    def pid(self) -> int:
        return os.getpid()

    def process(self, in_shard: str, out_path: str) -> dict:
        t0 = time.monotonic()
        run, k = self.run, self.run.num_classes
        if self.model is not None:
            part = {self.what: score_segmenter_shard(self.model, in_shard, k, self.device)}
        else:
            c = self.cfg
            part = {name: score_label_shard(in_shard, run.stage_dir(stage), field, k,
                                            c.cams.eval_bg_score, c.random_walk.bg_alpha,
                                            regions=name in REGION_FIGURES,
                                            aff_stride=c.model.aff_stride,
                                            neutral=stage in table.LABEL_STAGES
                                            and table.label_stage(stage).neutral)
                    for name, (stage, field) in label_figures(c).items()}
        atomic_write_json(out_path, {"shard": str(in_shard), "what": self.what, "parts": part})
        return {"shard": str(in_shard), "samples": max(p["samples"] for p in part.values()),
                "failed": [], "seconds": round(time.monotonic() - t0, 3), "pid": os.getpid(),
                "device": str(self.device)}


def parts_dir(run: Run, what: str) -> Path:
    return run.eval_parts(what)


def _stat(path: Path) -> list:
    # a missing input is no fingerprint error: the worker reading it names the file
    return [path.stat().st_size, path.stat().st_mtime_ns] if path.is_file() else ["missing"]


def part_paths(run: Run, what: str, shards: list) -> list[Path]:
    """Where each shard's part goes, named by the fingerprint of what it is computed from."""
    cfg = run.cfg
    if what in SEGMENTERS:
        common = {"checkpoint": _stat(run.checkpoint(what))}
    else:
        common = {"bg_score": cfg.cams.eval_bg_score, "bg_alpha": cfg.random_walk.bg_alpha,
                  "aff_stride": cfg.model.aff_stride}
    paths = []
    for shard in shards:
        inputs = dict(common, shard=shard_basename(shard))
        if what not in SEGMENTERS:
            inputs["labels"] = {st: _stat(output_path(run.stage_dir(st), shard))
                                for st in sorted({st for st, _ in label_figures(cfg).values()})}
        fp = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]
        paths.append(parts_dir(run, what) / f"{Path(shard_basename(shard)).stem}.{fp}.json")
    return paths


def _remove_stale(directory: Path, keep: list[Path]) -> int:
    if not directory.is_dir():
        return 0
    stale = [p for p in directory.glob("*.json") if p not in set(keep)]
    for p in stale:
        p.unlink()
    return len(stale)


def score_on_pool(run: Run, what: str, shards: list, counts: dict) -> list[dict]:
    """Every shard's part of ``what`` (computed on the pool where missing); an error names the
    shards without a part."""
    paths = part_paths(run, what, shards)
    stale = _remove_stale(parts_dir(run, what), paths)
    if stale:
        print(f"[eval] {what}: {stale} parts of earlier inputs removed", flush=True)
    pool = run_pool(run, f"eval_{what}", EvalWorker, (what, run.cfg),
                    uses_model=what in SEGMENTERS,
                    log_path=run.shard_log(f"eval_{what}"))
    summary = pool.run(list(zip(shards, paths)), counts)
    missing = [(str(s), str(p)) for s, p in zip(shards, paths) if not p.is_file()]
    if missing:
        why = {f["shard"]: f["reason"] for f in summary.get("failed_shards", [])}
        raise RuntimeError(f"eval {what}: {len(missing)} shards not scored: " + "; ".join(
            f"{s}: {why.get(s, 'no part written')} ({p})" for s, p in missing[:5]))
    parts = []
    for p in paths:
        try:
            parts.append(json.loads(p.read_text())["parts"])
        except (ValueError, KeyError) as e:
            raise RuntimeError(f"{p}: unreadable eval part ({e}): remove it and rerun eval") from e
    return parts


def _counts(run: Run, split: str, shards: list) -> dict:
    return {str(url): s["count"] for url, s in zip(shards, run.info["splits"][split]["shards"])}


def eval_of(cfg: Config) -> dict:
    """The eval stage of the run ``cfg`` (what a Ray cluster's job runs, ``AtAddress``)."""
    return run_eval(Run(cfg))


def run_eval(run: Run) -> dict:
    """The eval stage: every label stage's outputs and the walk's ceiling on the train split, and
    each trained segmenter on the val split; the figures summed from the shards' parts."""
    cfg = run.cfg
    if in_own_job(cfg.ray):     # as the label stages: its own job
        return submit_ray_job(cfg.ray, AtAddress(eval_of, cfg), run.submitit,
                              f"psa-{cfg.name}-eval", "eval")
    k, train, val = run.num_classes, cfg.data.train_split, cfg.data.val_split
    train_shards = split_shards(run.root, train, run.info, cfg.data.shard_url)
    parts = score_on_pool(run, "labels", train_shards, _counts(run, train, train_shards))
    res, regions = {}, {}
    for name, (_, field) in label_figures(cfg).items():
        res[name], regions[name] = label_result([p[name] for p in parts], field, k)
    # per object: lost by the CAM, by the walk, and found by the CAM but lost by the walk
    res["cam"]["objects"] = lost_objects(regions["cam"])
    res["rw"]["objects"] = lost_objects(regions["rw"], regions["cam"])
    val_shards = split_shards(run.root, val, run.info, cfg.data.shard_url)
    for model in ["seg"] + (["seg_full"] if cfg.seg_full else []):
        if not run.checkpoint(model).is_file():
            print(f"[eval] {model}: no checkpoint yet (run train-seg), not evaluated", flush=True)
            continue
        seg_parts = score_on_pool(run, model, val_shards, _counts(run, val, val_shards))
        res[model] = segmenter_result([p[model] for p in seg_parts], k)
    print_results(res)
    return res


def per_class_markdown(names: list[str], iou: list[float], title: str) -> str:
    """The per-class IoU (%) table of one prediction, as report.md lays it out."""
    cells = ["-" if v != v else f"{100 * v:.1f}" for v in iou]
    miou = 100 * float(np.nanmean(iou)) if len(iou) else float("nan")
    return "\n".join([f"# {title}", "", "| " + " | ".join(names) + " | mIoU |",
                      "|---|" + "---|" * len(names),
                      "| " + " | ".join(cells) + f" | **{miou:.1f}** |", ""])


def score_predictions(root, split: str, pred_dir, num_classes: int, names: list[str]) -> dict | None:
    """Index PNGs ``pred_dir/<key>.png`` against the masks of ``split`` of the dataset at ``root``
    (None when it has no masks): mIoU, per-class IoU, the confusion matrix and a markdown table.
    A prediction missing for a masked image is an error that names it."""
    cm = ConfusionMatrix(num_classes + 1)
    scored = 0
    for shard in split_shards(root, split):
        for raw, _ in iter_joined(shard):
            gt = decode_sample(raw, ["mask"]).get("mask")
            if gt is None:
                continue
            path = Path(pred_dir) / f"{raw['__key__']}.png"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no prediction for {raw['__key__']} of {shard}")
            with Image.open(path) as im:
                pred = np.asarray(im)
            cm.update(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(gt.astype(np.int64)))
            scored += 1
    if not scored:
        return None
    iou = [float(v) for v in cm.iou()]
    return {"miou": cm.miou(), "iou": iou, "classes": names, "images": scored,
            "confusion": cm.mat.tolist(),
            "markdown": per_class_markdown(names, iou, f"Predictions on {root} ({split})")}
