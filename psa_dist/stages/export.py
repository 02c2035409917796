"""`psa-dist export`: a run's results as plain files other tools read, one file per image named by
its key.

``--what``: ``pseudo`` (the random walk's pseudo labels), ``aff_labels`` (confident-region labels,
255 neutral), ``cams`` (float16 ``.npy`` maps), ``pred`` (the trained segmenter's prediction, on
the val split by default). Labels are index PNGs with the dataset's colour palette (VOC's for VOC;
class ids unchanged, 255 ignore), beside the images, in either layout:

=========  ===================================================================================
``voc``    ``JPEGImages/<key>.jpg``, ``SegmentationClassAug/<key>.png``,
           ``ImageSets/Segmentation/<split>.txt`` (DeepLab, the authors' and IRN's loaders)
``mmseg``  ``img_dir/<split>/<key>.jpg``, ``ann_dir/<split>/<key>.png``, ``splits/<split>.txt``
=========  ===================================================================================

CAMs go to ``cams/<key>.npy`` (float16, (K, H, W) for the image's K classes) with
``cams/<split>.txt`` listing each key and its class ids in the maps' order.

Shards are streamed by worker processes, one shard a task; every file is written atomically and
every finished shard leaves a marker in ``.export/``, so a rerun resumes. A sample that cannot be
decoded is reported with its key and reason, counted, and the rest is written.
"""
from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import Config
from ..core.image import normalize
from ..core.segment import segment_probs
from ..data.shards import (SampleError, decode_sample, image_field, iter_joined, output_path,
                           split_shards)
from ..util.atomic import atomic_write_bytes, atomic_write_json
from ..util.progress import Progress
from ..util.runinfo import write_run_info
from .run_dir import Run
from . import table
from .export_layouts import LAYOUTS, layout_paths
from .model_factory import load_trained

IGNORE_COLOUR = (224, 224, 192)     # VOC draws ignore / neutral (255) in this colour


class ExportError(ValueError):
    """An export that cannot be made as asked (missing stage, occupied directory, bad key)."""


def label_png(label: np.ndarray, palette) -> bytes:
    """An index PNG (mode "P") of ``label``: the values unchanged, shown in ``palette``."""
    pal = np.zeros((256, 3), np.uint8)
    pal[:len(palette)] = np.asarray(palette, np.uint8)
    pal[255] = IGNORE_COLOUR
    img = Image.fromarray(label.astype(np.uint8), mode="P")
    img.putpalette(pal.flatten().tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def paths(layout: str, split: str) -> dict:
    """Where a layout puts images, labels and the image list (relative to the output)."""
    if layout not in LAYOUTS:
        raise ExportError(f"--layout: {layout!r} unknown (one of {', '.join(LAYOUTS)})")
    return layout_paths(layout, split)


def _safe_key(key: str, shard) -> str:
    if not key or key.startswith("/") or ".." in key.split("/"):
        raise ExportError(f"{shard}: key {key!r} cannot name a file")
    return key


_SEG = {}       # the segmenter of this worker process (what=pred), loaded once


def _worker_init(cfg: Config, what: str, threads: int) -> None:
    torch.set_num_threads(threads)
    if what == table.PRED:
        run = Run(cfg, prepare=False)
        _SEG["model"], _SEG["device"] = load_trained(run, "seg"), run.device


def export_shard(task: dict) -> dict:
    """Export one shard (a task of the pool); returns its keys, class ids and failures."""
    out, what, where, palette = Path(task["out"]), task["what"], task["paths"], task["palette"]
    stage = table.resolve(task["module"]) if task["module"] else None      # None: pred
    streams = [task["labels"]] if task["labels"] else []
    keys, ids, failed = [], [], []
    for raw, labs in iter_joined(task["shard"], *streams):
        key = _safe_key(raw["__key__"], task["shard"])
        try:
            s = decode_sample(raw, ["image", "cls"] if stage is None or stage.export_needs_image
                              else ["cls"])
            value = None
            if stage is not None:
                hw = s["image"].shape[:2] if "image" in s else None
                value = stage.exported(decode_sample(labs[0], [stage.field])[stage.field], hw,
                                       task["cfg"])
        except ValueError as e:     # a SampleError, or labels not on the cell grid
            failed.append({"key": key, "reason": str(e)})
            continue
        if stage is not None and stage.export_array:
            buf = io.BytesIO()
            np.save(buf, value.astype(np.float16))
            atomic_write_bytes(out / what / f"{key}.npy", buf.getvalue())
        else:
            if stage is None:
                with torch.inference_mode():
                    x = normalize(torch.from_numpy(s["image"])[None].to(_SEG["device"]))
                    probs = segment_probs(_SEG["model"], x, task["scales"], task["flip"])
                label = probs.argmax(0).cpu().numpy()
            else:
                label = value
            ext = image_field(raw)
            atomic_write_bytes(out / where["images"] / f"{key}.{'jpg' if ext == 'jpeg' else ext}",
                               raw[ext])
            atomic_write_bytes(out / where["labels"] / f"{key}.png", label_png(label, palette))
        keys.append(key)
        ids.append(s.get("cls", []))
    res = {"shard": str(task["shard"]), "keys": keys, "class_ids": ids, "failed": failed}
    atomic_write_json(Path(task["marker"]), res)
    return res


def _check_target(out: Path, manifest: dict, overwrite: bool) -> None:
    """An export goes into an empty directory, or one holding the same export (to resume)."""
    if not out.exists() or not any(out.iterdir()):
        return
    mf = out / "export.json"
    same = mf.is_file() and {k: v for k, v in json.loads(mf.read_text()).items()
                             if k in ("what", "layout", "split")} == \
        {k: manifest[k] for k in ("what", "layout", "split")}
    if not same and not overwrite:
        prev = json.loads(mf.read_text()) if mf.is_file() else None
        other = (f" (another export: --what {prev['what']}, {prev['layout']} layout, split "
                 f"{prev['split']})" if prev else "")
        raise ExportError(f"{out} already holds other files{other}: choose an empty --out, or "
                          f"pass --overwrite")


def export(cfg: Config, what: str, out, layout: str = "voc", split: str | None = None,
           workers: int = 2, overwrite: bool = False, scales=(1.0,), flip: bool = False) -> dict:
    """Write ``what`` of the run ``cfg`` into ``out``; returns the summary (also in export.json)."""
    if what not in table.exports(cfg):
        raise ExportError(f"--what: {what!r} unknown (one of {', '.join(table.exports(cfg))})")
    run = Run(cfg)
    stage = table.exports(cfg)[what]
    if not run.done(stage):
        raise ExportError(f"export --what {what} needs the {stage} stage, which {run.out} does not "
                          f"have: run `psa-dist {stage.replace('_', '-')} CONFIG` first")
    label_split = cfg.data.train_split
    split = split or (cfg.data.val_split if what == table.PRED else label_split)
    if what != table.PRED and split != label_split:
        raise ExportError(f"--split {split}: the label stages cover data.train_split={label_split} "
                          f"only; `psa-dist label` makes them for other data")
    out = Path(out)
    where = paths(layout, split)
    manifest = {"what": what, "layout": layout, "split": split, "run": str(run.out),
                "dataset": str(run.root), "scales": list(scales), "flip": flip}
    _check_target(out, manifest, overwrite)
    markers = out / ".export"
    if overwrite and markers.is_dir():
        for m in markers.glob("*.json"):
            m.unlink()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "export.json", manifest)
    write_run_info(out, cfg)
    shards = split_shards(run.root, split, run.info, cfg.data.shard_url)
    counts = {s["name"]: s["count"] for s in run.info["splits"][split]["shards"]}
    tasks = [{"shard": str(s), "out": str(out), "what": what, "paths": where,
              "palette": run.info["palette"], "scales": list(scales), "flip": flip,
              "cfg": cfg, "module": table.stage(stage).module,
              "labels": str(output_path(run.stage_dir(stage), s)) if what != table.PRED else None,
              "marker": str(markers / f"{Path(s).name}.json")} for s in shards]
    todo = [t for t in tasks if not Path(t["marker"]).is_file()]
    bar = Progress(f"export {what}", total=sum(counts.get(Path(t["shard"]).name, 0) for t in todo))
    workers = max(1, min(workers, len(todo) or 1))
    threads = max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1) // workers)
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_worker_init, initargs=(cfg, what, threads)) as pool:
        for res in pool.imap_unordered(export_shard, todo):
            bar.update(len(res["keys"]), failed=len(res["failed"]))
            for f in res["failed"]:
                print(f"[export] {res['shard']}: sample {f['key']} not exported: {f['reason']}",
                      flush=True)
    results = [json.loads(Path(t["marker"]).read_text()) for t in tasks]
    keys = [(k, ids) for r in results for k, ids in zip(r["keys"], r["class_ids"])]
    if what != table.PRED and table.label_stage(stage).export_array:   # each key and its class ids
        listing = "".join(" ".join([k, *map(str, ids)]) + "\n" for k, ids in keys)
        atomic_write_bytes(out / what / f"{split}.txt", listing.encode())
    else:
        atomic_write_bytes(out / where["list"], "".join(f"{k}\n" for k, _ in keys).encode())
    failed = [f for r in results for f in r["failed"]]
    stats = bar.close(f"{len(keys)} images written to {out} ({what}, {layout} layout), "
                      f"{len(tasks) - len(todo)} shards already there")
    summary = {**manifest, "images": len(keys), "failed": failed, "seconds": stats["seconds"]}
    atomic_write_json(out / "export.json", summary)
    return summary

