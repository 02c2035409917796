"""`psa-dist run` and `psa-dist <stage>`: the stages of the table (``stages/table.py``) in order, as
cached steps of one run directory (``stages/run_dir.py`` has its layout); and `psa-dist label`: a
run's label stages pointed at another dataset.

Before the first stage starts, the whole chain is checked (:func:`check_chain`): every stage's
earlier stages are done or will run before it, and the optional packages its settings need are
installed, so a missing CRF is an error at once and not after a quarter of an hour of training;
a SLURM job shape that does not fit its work (``stages/job_shape.py``) is a warning at the same point.
A rerun skips every stage with a marker; each stage resumes inside itself (trainers from their
checkpoint, label stages at the first missing shard).
"""
from __future__ import annotations

import copy
import os
import shutil
import time
from pathlib import Path

from .config import Config, ConfigError
from .stages import table
from .stages.evaluate import eval_label_shards, run_eval
from .stages.label_pool import run_label_stage
from .stages.report import write_report
from .stages.run_dir import Run, is_main_process
from .stages.job_shape import warn_shape
from .stages.train import run_train_stage
from .util.atomic import atomic_path
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


def warn_changed(run: Run, cached: list[str]) -> dict[str, list[str]]:
    """Say which cached stages were made with other settings than the config's now. They are
    kept, not redone (a trained model can be hours of work; a changed cap of epochs may be meant
    to resume): the warning names the command that redoes them."""
    changed = run.changed_since_done(cached)
    if changed and is_main_process():
        first = min(changed, key=STAGES.index)
        for name, keys in changed.items():
            print(f"[run] warning: {name} is cached from a run with other settings "
                  f"({', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}); its outputs are "
                  f"kept", flush=True)
        print(f"[run] warning: to redo them with these settings: psa-dist run CONFIG "
              f"--from {table.stage(first).cli}", flush=True)
    return changed


def run_stage(run: Run, name: str, force: bool = False) -> dict | None:
    """One stage, unless its marker says it is done; writes the marker with its summary.
    ``force``: redone from scratch, its earlier outputs removed first (a trainer's checkpoint
    would otherwise be resumed, a label stage's shards skipped)."""
    if run.done(name) and not force:
        print(f"[run] {name}: done (cached in {run.marker(name)})", flush=True)
        return None
    if run.of_other_method(name):       # its outputs come from the other method's labels
        print(f"[run] {name}: made with another method than method={run.cfg.method}; redone",
              flush=True)
        force = True
    if force and is_main_process():
        cleared = run.clear_outputs(name)
        if cleared:
            print(f"[run] {name}: redone from scratch (removed {', '.join(cleared)})", flush=True)
    t0 = time.monotonic()
    summary = RUNNERS[table.stage(name).kind](run, name)
    summary = {"seconds": round(time.monotonic() - t0, 2), **summary}
    run.finish(name, summary)
    return summary


def run_pipeline(cfg: Config, stages: list[str] | None = None, force: bool = False,
                 redo_from: str | None = None) -> int:
    """The stages ``stages`` (default: all) of ``cfg`` in table order, into ``cfg.out_dir``;
    ``force`` redoes them all, ``redo_from`` that stage and every later one."""
    stages = list(stages or table.stages_of(cfg))
    for name in stages + ([redo_from] if redo_from else []):
        table.stage(name)                       # an unknown name fails before anything runs
    own = table.stages_of(cfg)
    if redo_from and redo_from not in own:
        raise ConfigError(f"--from {table.stage(redo_from).cli}: not a stage of method="
                          f"{cfg.method} (its stages: {', '.join(own)})")
    redo = set(own[own.index(redo_from):]) if redo_from else set()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        write_run_info(out, cfg)
    run = Run(cfg)
    run.check_same_dataset(force)
    to_run = [s for s in stages if force or s in redo or not run.done(s)]
    warn_changed(run, [s for s in stages if s not in to_run])
    warn_shape(cfg, to_run)     # SLURM jobs whose shape does not fit their work: said first
    check_chain(cfg, to_run, run.done)
    print(f"[run] {cfg.name}: {run.num_train} train images, {run.num_classes} classes, device "
          f"{run.device}, outputs in {out}", flush=True)
    t0 = time.monotonic()
    for name in stages:
        run_stage(run, name, force=force or name in redo)
    where = f"; report in {out / 'report.md'}" if "report" in stages else f"; outputs in {out}"
    print(f"[run] {cfg.name}: finished in {time.monotonic() - t0:.0f}s{where}", flush=True)
    return 0


def _link_or_copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:             # another file system: a copy
            shutil.copyfile(src, tmp)


def label_dataset(cfg: Config, dataset, out, split: str = "train") -> dict:
    """CAMs and pseudo labels (the walk of ``cfg.method``) for ``split`` of another (converted)
    dataset, from the classifier and the walk's network the run ``cfg`` trained (AffinityNet, or
    IRN's boundary branch): a run directory ``out`` whose models are the run's (linked, not
    trained) and whose label stages read ``dataset``. Where the dataset has masks, both are
    scored. Returns the summary."""
    src = Run(cfg, prepare=False)
    walk = table.method_stage(cfg, table.PSEUDO)
    models = [(table.MODELS[m].stage, m) for m in ("cls", *table.stage(walk).uses_models)]
    for stage, model in models:
        if not src.done(stage) or not src.checkpoint(model).is_file():
            raise ChainUnmet(f"label needs the run's {stage} ({src.checkpoint(model)}): run "
                             f"`psa-dist {table.stage(stage).cli} CONFIG` first")
    new = copy.deepcopy(cfg)
    new.data.root, new.data.source, new.data.shard_url = str(dataset), "shards", None
    new.data.train_split, new.out_dir = split, str(out)
    dst = Run(new)
    if split not in dst.info["splits"]:
        raise ConfigError(f"{dataset}: no split {split!r} (have {', '.join(dst.info['splits'])})")
    for stage, model in models:
        _link_or_copy(src.checkpoint(model), dst.checkpoint(model))
        if not dst.done(stage):
            dst.finish(stage, {"seconds": 0.0, "models_from": str(src.out)})
    run_pipeline(new, stages=["cams", walk])
    summary = {"dataset": str(dataset), "split": split, "out": str(out), "models_from": str(src.out),
               "images": dst.num_train}
    scores = {"cam": ("cams", "cam"), "rw": (walk, "pseudo")}
    for key, (stage, field) in scores.items():
        res = eval_label_shards(dst.root, split, dst.stage_dir(stage), field, dst.num_classes,
                                new.cams.eval_bg_score)
        if res["confusion"] and any(map(any, res["confusion"])):
            summary[f"miou_{key}"] = round(res["miou"], 2)
    if "miou_rw" in summary:
        print(f"[label] against the masks of {dataset} ({split}): CAM {summary['miou_cam']:.1f}, "
              f"random walk {summary['miou_rw']:.1f} mIoU", flush=True)
    print(f"[label] pseudo labels of {dst.num_train} images in {dst.stage_dir(walk)}; "
          f"`psa-dist export` them with out_dir={out} data.root={dataset} data.source=shards",
          flush=True)
    return summary
