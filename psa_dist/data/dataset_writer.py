"""Builds a dataset directory (shards + dataset.json) from a per-item sample function.

Shared by the synthetic generator and the VOC / COCO converters: items are mapped to encoded samples
in worker processes (ordered, so the shards do not depend on the number of workers), cut into
shards, and summarised in ``dataset.json``. Bad input never kills the build: an item whose function
raises is reported with its reason and counted (``--strict`` stops at the first one instead).
"""
from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Callable, Sequence

from ..util.atomic import atomic_write_json
from ..util.progress import Progress
from ..util.runinfo import run_info
from .shards import ShardedWriter


class SkipSample(Exception):
    """An item that is legitimately left out (e.g. a COCO image without labels): counted, not an error."""


class BuildError(RuntimeError):
    """Raised in strict mode at the first bad item, naming it."""


def _call(fn: Callable, item):
    try:
        return "ok", fn(item), None
    except SkipSample as e:
        return "skip", None, str(e)
    except Exception as e:  # noqa: BLE001 - reported with the item, counted, never silently dropped
        return "fail", None, f"{type(e).__name__}: {e}"


class _Bound:
    """Picklable closure over the sample function."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, item):
        return _call(self.fn, item)


def _describe(item) -> str:
    return item if isinstance(item, str) else repr(item)


def build_dataset(root: str | Path, splits: dict[str, Sequence], make_sample: Callable, *,
                  classes: list[str], palette: list[list[int]], source: dict, shard_size: int = 100,
                  workers: int = 2, strict: bool = False, config=None, progress: bool = True) -> dict:
    """Write ``{split}-NNNNNN.tar`` for every split and ``dataset.json`` last (its presence = complete)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    info = {"classes": classes, "palette": palette, "num_classes": len(classes),
            "source": source, "splits": {}, "skipped": [], "failed": []}
    fn = _Bound(make_sample)
    ctx = mp.get_context("spawn" if workers > 1 else "fork")
    pool = ctx.Pool(workers) if workers > 1 else None
    try:
        for split, items in splits.items():
            bar = Progress(f"data {split}", total=len(items), enabled=progress)
            results = pool.imap(fn, items, chunksize=8) if pool else map(fn, items)
            with ShardedWriter(root, split, shard_size) as writer:
                for item, (status, sample, reason) in zip(items, results):
                    if status == "ok":
                        writer.write(sample)
                        bar.update(1)
                        continue
                    entry = {"split": split, "item": _describe(item), "reason": reason}
                    if status == "skip":
                        info["skipped"].append(entry)
                        bar.update(0, skipped=len(info["skipped"]))
                        continue
                    print(f"[data {split}] bad input {entry['item']}: {reason}", flush=True)
                    if strict:
                        raise BuildError(f"{entry['item']}: {reason} (strict mode)")
                    info["failed"].append(entry)
                    bar.update(0, failed=1)
            shards = writer.shards
            info["splits"][split] = {"count": sum(s["count"] for s in shards), "shards": shards}
            bar.close(f"{len(shards)} shards")
    finally:
        if pool:
            pool.close()
            pool.join()
    info["provenance"] = run_info(config)
    atomic_write_json(root / "dataset.json", info)
    counts = ", ".join(f"{s} {v['count']}" for s, v in info["splits"].items())
    print(f"[data] wrote {root}: {counts} samples; {len(info['skipped'])} skipped, "
          f"{len(info['failed'])} failed", flush=True)
    return info
