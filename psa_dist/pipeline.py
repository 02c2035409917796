"""`psa-dist run`: the whole method as a chain of cached stages in one run directory."""
from __future__ import annotations

import time
from pathlib import Path

from .config import Config
from .runinfo import write_run_info
from .shards import atomic_write_json


def ensure_dataset(cfg: Config) -> Path:
    """The dataset directory of the config; the synthetic one is generated when missing."""
    root = Path(cfg.data.root)
    if (root / "dataset.json").is_file():
        return root
    if cfg.data.source != "synth":
        raise FileNotFoundError(f"data.root={root} has no dataset.json: convert the dataset first "
                                f"(psa-dist data convert-{cfg.data.source})")
    from .synth import write_synth
    write_synth(cfg.synth, root, shard_size=cfg.data.shard_size, workers=cfg.data.workers,
                config=cfg)
    return root


def run_pipeline(cfg: Config) -> int:
    from .inspect_data import format_report, inspect_dataset
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_run_info(out, cfg)
    t0 = time.monotonic()
    root = ensure_dataset(cfg)
    report = inspect_dataset(root)
    print(format_report(report))
    atomic_write_json(out / "data_report.json", report)
    print(f"[run] {cfg.name}: dataset ready in {time.monotonic() - t0:.1f}s; outputs in {out}")
    return 1 if report["problems"] else 0
