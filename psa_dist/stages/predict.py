"""`psa-dist predict`: the trained segmenter on new images: a folder of JPEG/PNG files, a glob, or
a shard dataset (``dataset.json``), optionally multi-scale + flip and the dense CRF.

Writes ``<name>.png`` (index PNG in the run's palette, class ids as the run's dataset numbers them)
and ``overlay/<name>.png`` (the image with the prediction drawn over it) per image; ``<name>`` is
the file's path below the input folder without its extension, or the sample's key. The work goes
through the label stages' scheduler (:class:`~psa_dist.cluster.shard_pool.ShardPool`): Ray actors
over tasks (a shard, or a chunk of files) with ``ray.enabled``, else this process; the same
progress, resume (a task's marker in ``.predict/``, and images whose outputs exist) and failure
accounting (a corrupt or non-image file is reported with its path and reason, counted, and the rest
is processed; more than ``ray.max_failures`` of them fail the command). With ground truth (a shard
dataset with masks), the predictions are scored: ``eval.json`` and a per-class table in ``eval.md``.
"""
from __future__ import annotations

import glob
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import Config
from ..core.crf import crf_refine
from ..core.image import normalize
from ..core.segment import segment_probs
from ..data.dataset_view import overlay
from ..data.shards import (SampleError, decode_sample, iter_shard, read_dataset_json,
                           shard_basename, split_shards)
from ..util.atomic import atomic_write_bytes, atomic_write_json
from ..util.runinfo import write_run_info
from .evaluate import score_predictions
from .export import label_png
from .label_pool import run_pool
from .label_stages.base import crf_settings
from .model_factory import load_trained
from .run_dir import Run, worker_device

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CHUNK = 64          # files per task when the input is a folder or a glob


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def find_images(pattern: str) -> list[tuple[str, str]]:
    """(path, name) of every image a folder holds (recursively) or a glob matches; ``name``: the
    path below the folder (or the glob's fixed part) without its extension."""
    p = Path(pattern)
    if p.is_dir():
        base, files = p, sorted(f for f in p.rglob("*") if f.is_file())
    elif p.is_file():
        base, files = p.parent, [p]
    else:
        fixed = pattern.split("*")[0].split("?")[0].split("[")[0]
        base = Path(fixed if fixed.endswith(os.sep) else os.path.dirname(fixed) or ".")
        files = sorted(Path(f) for f in glob.glob(pattern, recursive=True) if Path(f).is_file())
    files = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES and "overlay" not in f.parts]
    return [(str(f), str(f.relative_to(base).with_suffix(""))) for f in files]


class PredictWorker:
    """Loads the segmenter once, then predicts the images of a task: a shard, or a chunk file
    listing (path, name) pairs."""

    def __init__(self, cfg: Config, out: str, scales, flip: bool, crf: bool, split: str,
                 device: str = "cpu", threads: int = 1):
        torch.set_num_threads(threads)
        self.run = Run(cfg, prepare=False)
        self.out, self.scales, self.flip, self.split = Path(out), tuple(scales), flip, split
        self.crf = crf_settings(cfg, True) if crf else None
        self.device = worker_device(device)
        self.model = load_trained(self.run, "seg", self.device)
        self.palette = self.run.info["palette"]

    def pid(self) -> int:
        return os.getpid()

    def _images(self, task: str, failed: list):
        """(name, uint8 image) of the task's images; unreadable ones go to ``failed``."""
        if task.endswith(".files.json"):
            for path, name in json.loads(Path(task).read_text()):
                try:
                    with Image.open(path) as im:
                        yield name, np.asarray(im.convert("RGB"))
                except Exception as e:  # noqa: BLE001 - any unreadable file: reported, work goes on
                    failed.append({"path": path, "reason": f"{type(e).__name__}: {e}"})
            return
        for raw in iter_shard(task):
            try:
                yield raw["__key__"], decode_sample(raw, ["image"])["image"]
            except SampleError as e:
                failed.append({"key": raw["__key__"], "reason": str(e)})

    @torch.inference_mode()
    def predict(self, image: np.ndarray) -> np.ndarray:
        x = normalize(torch.from_numpy(image)[None].to(self.device))
        probs = segment_probs(self.model, x, self.scales, self.flip)
        if self.crf is not None:
            probs = crf_refine(image, probs.cpu(), **self.crf)
        return probs.argmax(0).cpu().numpy().astype(np.uint8)

    def process(self, task: str, marker: str) -> dict:
        t0, failed, n, skipped = time.monotonic(), [], 0, 0
        for name, image in self._images(task, failed):
            label_path = self.out / f"{name}.png"
            over_path = self.out / "overlay" / f"{name}.png"
            if label_path.is_file() and over_path.is_file():     # resumed mid-task
                skipped += 1
                continue
            label = self.predict(image)
            atomic_write_bytes(over_path, _png(overlay(image, label, self.palette)))
            atomic_write_bytes(label_path, label_png(label, self.palette))
            n += 1
        res = {"shard": task, "samples": n + skipped, "written": n, "failed": failed,
               "seconds": round(time.monotonic() - t0, 3), "pid": os.getpid()}
        atomic_write_json(Path(marker), res)
        return res


def predict(cfg: Config, input_path: str, out, scales=(1.0,), flip: bool = False,
            crf: bool = False, split: str | None = None, use_ray: bool | None = None) -> dict:
    """Predict every image of ``input_path`` into ``out``; returns the summary."""
    run = Run(cfg)
    if not run.checkpoint("seg").is_file():
        raise FileNotFoundError(f"{run.checkpoint('seg')} not found: run `psa-dist train-seg "
                                f"CONFIG` first")
    out, inp = Path(out), Path(input_path)
    work = out / ".predict"
    work.mkdir(parents=True, exist_ok=True)
    write_run_info(out, cfg)
    dataset = inp.is_dir() and (inp / "dataset.json").is_file()
    if dataset:
        info = read_dataset_json(inp)
        split = split or cfg.data.val_split
        if split not in info["splits"]:
            raise ValueError(f"{inp}: no split {split!r} (have {', '.join(info['splits'])})")
        shards = [str(s) for s in split_shards(inp, split, info)]
        counts = {s: c["count"] for s, c in zip(shards, info["splits"][split]["shards"])}
        tasks = [(s, str(work / f"{shard_basename(s)}.json")) for s in shards]
    else:
        files = find_images(input_path)
        if not files:
            raise FileNotFoundError(f"{input_path}: no JPEG or PNG files there")
        tasks, counts = [], {}
        for i in range(0, len(files), CHUNK):
            chunk = work / f"chunk-{i // CHUNK:06d}.files.json"
            if not chunk.is_file():
                atomic_write_json(chunk, files[i:i + CHUNK])
            tasks.append((str(chunk), str(work / f"chunk-{i // CHUNK:06d}.json")))
            counts[str(chunk)] = len(files[i:i + CHUNK])
    args = (cfg, str(out), tuple(scales), flip, crf, split)
    pool = run_pool(run, "predict", PredictWorker, args, uses_model=True,
                    log_path=work / "tasks.jsonl", use_ray=use_ray)
    summary = pool.run(tasks, counts)
    summary = {"input": str(input_path), "out": str(out), "scales": list(scales), "flip": flip,
               "crf": crf, **summary}
    if dataset:
        names = ["background"] + run.info["classes"]
        scored = score_predictions(inp, split, out, run.num_classes, names)
        if scored is not None:
            summary["miou"] = scored["miou"]
            atomic_write_json(out / "eval.json", scored)
            atomic_write_bytes(out / "eval.md", scored.pop("markdown").encode())
            print(f"[predict] mIoU {summary['miou']:.1f} against the masks of {inp} ({split}); "
                  f"per class in {out / 'eval.md'}", flush=True)
    atomic_write_json(out / "predict.json", summary)
    return summary
