"""`psa-dist bench quality`: the benchmark's goals over a sweep of synthetic-data variants, not one
seed. Each variant is the config (the demo's by default) run end to end on data generated with
other settings (seed, number of classes, clutter, body mark, object sizes), in its own run
directory under ``--out``; one row per variant goes into ``quality.jsonl`` as it finishes,
and ``quality.md`` holds the table with the spread. A variant whose row exists is not run again,
so the sweep can be run in parts (``--variants a b``), each a command of its own. With
``--from STAGE`` the variants are run again from that stage on (say the walk, after a change of
its settings), their trained models before it kept, and their rows replaced. With ``--methods psa
irn`` each variant runs both methods in its run directory, the second on the first's classifier
and CAMs: a row per variant and method, a table per method and one side by side.

The goals (issue 19): walk ≥ CAM + 8 mIoU, segmenter ≥ 85% of the fully supervised one, and the
walk's object recall not below the CAM's. No decision of the pipeline reads the ground truth; the
table does, to score it.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..config import METHODS, load_config
from ..stages.run_dir import RunDir
from ..stages.table import STAGES, shared, stage
from ..util.atomic import atomic_write_bytes
from .cases import VARIANTS

GOALS = {"walk_gain": 8.0, "seg_ratio": 0.85}


def row_of(name: str, overrides: list, out: Path, seconds: float) -> dict:
    """A variant's figures, from its report.json and eval marker."""
    report = json.loads((out / "report.json").read_text())
    ev = json.loads(RunDir(out).marker("eval").read_text())
    m = report["miou"]
    row = {"variant": name, "method": report.get("method", "psa"), "overrides": overrides,
           "cam": m["cam"], "walk": m["rw"],
           "walk_gain": report.get("rw_gain"), "cam_recall": round(ev["cam"]["fg_recall"], 3),
           "walk_recall": round(ev["rw"]["fg_recall"], 3), "seg": m.get("seg"),
           "seg_full": m.get("seg_full"), "seg_ratio": report.get("seg_vs_full"),
           "final_loss": report.get("final_loss", {}), "epochs": report.get("epochs", {}),
           "objects": report.get("objects", {}),
           "minutes": round(seconds / 60, 1)}
    row["goals_met"] = bool(row["walk_gain"] is not None and row["walk_gain"] >= GOALS["walk_gain"]
                            and row["seg_ratio"] is not None
                            and row["seg_ratio"] >= GOALS["seg_ratio"]
                            and row["walk_recall"] >= row["cam_recall"])
    return row


def _epochs(stopped: dict | None) -> str:
    """'23, fit after 19' or '12, kept 11': the epochs a trainer stopped when learned ran, and the
    epoch (counted from 1) it fit its labels after or whose weights it kept; '' for fixed epochs."""
    if not stopped:
        return ""
    if "fit" in stopped:
        return (f"{stopped['run']}, fit after {stopped['fit']}" if stopped["fit"] is not None
                else f"{stopped['run']}, never fit")
    return f"{stopped['run']}, kept {stopped['best']}"


def _dropped(row: dict) -> str:
    """'0.6%': of the objects the CAM found (an image's region of one class, at least 20% of its
    pixels labelled with it), the share the walk lost; '-' for rows recorded without it."""
    share = row.get("objects", {}).get("walk_dropped")
    return "-" if share is None else f"{100 * share:.1f}%"


def table(rows: list[dict]) -> str:
    """The sweep as markdown, one row per variant, then the spread of each column."""
    head = ("| variant | CAM | walk | walk − CAM | recall CAM → walk | objects the walk lost | "
            "segmenter / full | classifier loss (epochs) | walk network's epochs | minutes | goals |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        stopped = r.get("epochs", {})
        cls_epochs = _epochs(stopped.get("cls"))
        aff_epochs = _epochs(stopped.get("aff") or stopped.get("irn"))    # AffinityNet's or IRN's
        ratio = f"{r['seg']:.1f} / {r['seg_full']:.1f} = {100 * r['seg_ratio']:.0f}%" \
            if r.get("seg_ratio") else "-"
        lines.append(f"| {r['variant']} | {r['cam']:.1f} | {r['walk']:.1f} | {r['walk_gain']:+.1f} | "
                     f"{r['cam_recall']:.3f} → {r['walk_recall']:.3f} | {_dropped(r)} | {ratio} | "
                     f"{r['final_loss'].get('cls', float('nan')):.3f}"
                     f"{cls_epochs and f' ({cls_epochs})'} | {aff_epochs or '-'} | "
                     f"{r['minutes']:.1f} | "
                     f"{'met' if r['goals_met'] else '**not met**'} |")
    if len(rows) > 1:
        def spread(key, scale=1.0, fmt="{:.1f}"):
            vals = [scale * r[key] for r in rows if r.get(key) is not None]
            return (f"{fmt.format(statistics.mean(vals))} ({fmt.format(min(vals))} – "
                    f"{fmt.format(max(vals))})")
        lines.append(f"| mean (min – max) | {spread('cam')} | {spread('walk')} | "
                     f"{spread('walk_gain')} | | | {spread('seg_ratio', 100, '{:.0f}')}% | | | "
                     f"{spread('minutes')} | {sum(r['goals_met'] for r in rows)}/{len(rows)} |")
    return "\n".join(lines) + "\n"


def bench_quality(config: str, names: list[str] | None = None, out_root="runs/quality",
                  overrides: list | None = None, variants: dict | None = None,
                  redo_from: str | None = None, methods: list[str] | None = None) -> list[dict]:
    """Run the variants ``names`` (default: all of ``variants``, the table above by default) not
    yet in ``out_root/quality.jsonl``; returns every row recorded. ``methods`` (say psa, irn):
    each in turn in the variant's run directory, so the later ones reuse its classifier and CAMs
    (a row per variant and method; default: the config's method). ``redo_from`` (a stage): run
    them all again from that stage on (``psa-dist run --from``) and replace their rows. A row's
    minutes are this run's and those the kept stages' markers record."""
    variants = VARIANTS if variants is None else variants
    unknown = [n for n in names or [] if n not in variants]
    if unknown:
        raise ValueError(f"bench quality: unknown variants {unknown} (have {', '.join(variants)})")
    redo = redo_per_method(redo_from, methods or [_config_method(config, overrides or [])])
    root = Path(out_root)
    root.mkdir(parents=True, exist_ok=True)
    log = root / "quality.jsonl"
    # rows from before IRN have no method: that sweep ran AffinityNet's only
    rows = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
    have = {(r["variant"], r.get("method", "psa")): r for r in rows}
    for name in names or list(variants):
        for method in methods or [None]:
            key = (name, method or _config_method(config, overrides or []))
            if key in have and not redo_from:
                print(f"[bench quality] {name} ({key[1]}): recorded in {log}", flush=True)
                continue
            row = _run_variant(config, name, method, root, overrides or [], variants[name],
                               redo[key[1]])
            rows = [row if (r["variant"], r.get("method", "psa")) == key else r for r in rows] \
                if key in have else rows + [row]
            have[key] = row
            atomic_write_bytes(log, "".join(json.dumps(r) + "\n" for r in rows).encode())
    order = {n: i for i, n in enumerate(variants)}
    rows.sort(key=lambda r: (order.get(r["variant"], len(order)),
                             METHODS.index(r.get("method", "psa"))))
    text = tables(rows)
    atomic_write_bytes(root / "quality.md", text.encode())
    print(f"[bench quality] {len(rows)} rows in {root / 'quality.md'}\n" + text, flush=True)
    return rows


def _config_method(config: str, overrides: list) -> str:
    return load_config(config, list(overrides)).method


def redo_per_method(redo_from: str | None, methods: list[str]) -> dict:
    """Where each method's run starts again for ``--from redo_from``: the first method from
    ``redo_from`` (one of its stages); a later one from its own first stage where ``redo_from``
    is shared (new CAMs make its labels stale; the CAMs are not redone twice), from ``redo_from``
    where that is one of its stages, else from nothing (its stages stand; what follows a
    stage redone by the other method is redone by the method switch)."""
    if not redo_from:
        return {m: None for m in methods}
    first = stage(redo_from)        # an unknown stage fails before anything runs
    if methods[0] not in first.methods:
        raise ValueError(f"bench quality: --from {redo_from} is not a stage of method="
                         f"{methods[0]}, the first of --methods")
    redo = {methods[0]: redo_from}
    for m in methods[1:]:
        if shared(redo_from):
            redo[m] = next(s.name for s in STAGES if m in s.methods and not shared(s.name))
        else:
            redo[m] = redo_from if m in first.methods else None
    return redo


def _run_variant(config: str, name: str, method: str | None, root: Path, overrides: list,
                 variant: list, redo_from: str | None) -> dict:
    """One variant under one method (None: the config's), in ``root/name``; its row."""
    out = root / name
    args = [*overrides, *variant, f"out_dir={out}", f"data.root={out}/data", f"name={name}",
            *([f"method={method}"] if method else [])] + (["--from", redo_from] if redo_from else [])
    print(f"[bench quality] {name}: psa-dist run {config} {' '.join(args)}", flush=True)
    started = time.time()
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "psa_dist.cli", "run", config, *args], check=True)
    # the stages kept (say the classifier and the CAMs of the method run before) took what their
    # markers say
    seconds = time.monotonic() - t0 + _kept_seconds(out, started)
    row = row_of(name, variant + list(overrides), out, seconds)
    if redo_from:
        row["redone_from"] = redo_from
    print(f"[bench quality] {name} ({row['method']}): CAM {row['cam']:.1f} -> walk "
          f"{row['walk']:.1f} ({row['walk_gain']:+.1f}), segmenter "
          f"{100 * (row['seg_ratio'] or 0):.0f}% of full; goals "
          f"{'met' if row['goals_met'] else 'NOT met'}", flush=True)
    return row


def _kept_seconds(out: Path, started: float) -> float:
    """The seconds the stages of the run in ``out`` whose markers are older than ``started`` (a
    wall-clock time) took: the stages this run kept (its report's stages; the report's own
    seconds are not recorded)."""
    report = json.loads((out / "report.json").read_text())
    total = 0.0
    for name in report.get("stage_seconds", {}):
        marker = RunDir(out).marker(name)
        if marker.is_file() and marker.stat().st_mtime < started:
            total += json.loads(marker.read_text()).get("seconds", 0.0)
    return total


def tables(rows: list[dict]) -> str:
    """The sweep's table per method, then both side by side where a variant ran both."""
    methods = list(dict.fromkeys(r.get("method", "psa") for r in rows))
    if len(methods) == 1:
        return table(rows)
    parts = [f"### {m}\n\n" + table([r for r in rows if r.get("method", "psa") == m])
             for m in methods]
    return "\n".join(parts) + "\n### side by side\n\n" + side_by_side(rows, methods)


def side_by_side(rows: list[dict], methods: list[str]) -> str:
    """One line per variant: the CAM, then each method's pseudo labels, gain, recall, segmenter
    against full supervision and minutes."""
    by = {(r["variant"], r.get("method", "psa")): r for r in rows}
    head = "| variant | CAM | " + " | ".join(
        f"{m}: walk (gain) | {m}: recall | {m}: segmenter / full | {m}: minutes" for m in methods)
    lines = [head + " |", "|" + "---|" * (2 + 4 * len(methods))]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        got = [by.get((variant, m)) for m in methods]
        cams = list(dict.fromkeys(f"{r['cam']:.1f}" for r in got if r))
        cam = " / ".join(cams)          # two figures: the methods' rows are on different CAMs
        cells = []
        for r in got:
            cells += (["-"] * 4 if r is None else
                      [f"{r['walk']:.1f} ({r['walk_gain']:+.1f})", f"{r['walk_recall']:.3f}",
                       f"{100 * r['seg_ratio']:.0f}%" if r.get("seg_ratio") else "-",
                       f"{r['minutes']:.1f}"])
        lines.append(f"| {variant} | {cam} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
