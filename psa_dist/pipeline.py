"""`psa-dist run` and `psa-dist <stage>`: the stages of the table (``stages/table.py``) in order, as
cached steps of one run directory (``stages/run_dir.py`` has its layout).

Before the first stage starts, the whole chain is checked (:func:`check_chain`): every stage's
earlier stages are done or will run before it, and the optional packages its settings need are
installed, so a missing CRF is an error at once and not after a quarter of an hour of training.
A rerun skips every stage with a marker; each stage resumes inside itself (trainers from their
checkpoint, label stages at the first missing shard).
"""
from __future__ import annotations

import time
from pathlib import Path

from .config import Config, ConfigError
from .stages import table
from .stages.evaluate import run_eval
from .stages.labels import run_label_stage
from .stages.report import write_report
from .stages.run_dir import Run, is_main_process
from .stages.train import run_train_stage
from .util.runinfo import write_run_info

STAGES = table.ORDER
RUNNERS = {"train": run_train_stage, "labels": run_label_stage,
           "eval": lambda run, name: run_eval(run), "report": lambda run, name: write_report(run)}


class ChainUnmet(ConfigError):
    """Stages asked for that cannot run through; the message lists each problem and its fix."""


def check_chain(cfg: Config, to_run: list[str], done) -> None:
    """Raise :class:`ChainUnmet` when the stages ``to_run`` cannot run through (see
    :func:`psa_dist.stages.table.unmet_needs`)."""
    problems = table.unmet_needs(cfg, to_run, done)
    if problems:
        raise ChainUnmet("cannot run " + ", ".join(to_run) + ":\n  " + "\n  ".join(problems))


def run_stage(run: Run, name: str, force: bool = False) -> dict | None:
    """One stage, unless its marker says it is done; writes the marker with its summary."""
    if run.done(name) and not force:
        print(f"[run] {name}: done (cached in {run.marker(name)})", flush=True)
        return None
    t0 = time.monotonic()
    summary = RUNNERS[table.stage(name).kind](run, name)
    summary = {"seconds": round(time.monotonic() - t0, 2), **summary}
    run.finish(name, summary)
    return summary


def run_pipeline(cfg: Config, stages: list[str] | None = None, force: bool = False) -> int:
    """The stages ``stages`` (default: all) of ``cfg`` in table order, into ``cfg.out_dir``."""
    stages = list(stages or STAGES)
    for name in stages:
        table.stage(name)                       # an unknown name fails before anything runs
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        write_run_info(out, cfg)
    run = Run(cfg)
    run.check_same_dataset(force)
    to_run = [s for s in stages if force or not run.done(s)]
    check_chain(cfg, to_run, run.done)
    print(f"[run] {cfg.name}: {run.num_train} train images, {run.num_classes} classes, device "
          f"{run.device}, outputs in {out}", flush=True)
    t0 = time.monotonic()
    for name in stages:
        run_stage(run, name, force=force)
    print(f"[run] {cfg.name}: finished in {time.monotonic() - t0:.0f}s; report in {out / 'report.md'}",
          flush=True)
    return 0
