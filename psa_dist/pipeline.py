"""`psa-dist run`: the whole method as a chain of cached stages in one run directory.

Layout of ``cfg.out_dir``::

    run_info.json            resolved config, versions, git commit
    stages/<stage>.json      written when a stage completes (its summary); its presence = done
    cls/ aff/ seg/ seg_full/ checkpoint.pth + log.jsonl of each trainer
    cams/ aff_labels/ rw/    one output shard per train shard (same keys, new field)
    report.json report.md panels/

A rerun skips every stage with a marker, resumes a trainer from its checkpoint, and redoes only the
label shards that are missing (shards are written atomically, so an existing one is complete).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from .config import Config
from .runinfo import write_run_info
from .shards import atomic_write_json, read_dataset_json, split_shards

STAGES = ["train_cls", "cams", "aff_labels", "train_aff", "random_walk", "train_seg", "eval", "report"]


def ensure_dataset(cfg: Config) -> Path:
    """The dataset directory of the config; the synthetic one is generated when missing."""
    root = Path(cfg.data.root)
    if (root / "dataset.json").is_file():
        if cfg.data.source != "synth" or _synth_matches(root, cfg):
            return root
    if cfg.data.source != "synth":
        raise FileNotFoundError(f"data.root={root} has no dataset.json: convert the dataset first "
                                f"(psa-dist data convert-{cfg.data.source})")
    from .synth import write_synth
    write_synth(cfg.synth, root, shard_size=cfg.data.shard_size, workers=cfg.data.workers,
                config=cfg)
    return root


def _synth_matches(root: Path, cfg: Config) -> bool:
    """Whether ``root`` holds the synthetic dataset of ``cfg.synth``; a generated dataset made
    with other settings (e.g. an older demo config) is removed so it is generated anew."""
    import dataclasses
    import json
    import shutil
    src = read_dataset_json(root).get("source", {})
    if src.get("kind") != "synth":
        raise FileExistsError(f"data.root={root} holds a dataset that is not synthetic "
                              f"({src.get('kind')!r}); set data.source or another data.root")
    want = json.loads(json.dumps(dataclasses.asdict(cfg.synth)))
    have = src.get("synth") or {}
    diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if not diff:
        return True
    print(f"[data] {root} was generated with other synth settings ({', '.join(diff)}): "
          f"generating it anew", flush=True)
    shutil.rmtree(root)
    return False


def resolve_device(cfg: Config) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


class Run:
    """Paths and shared facts of one run directory."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.root = ensure_dataset(cfg)
        self.info = read_dataset_json(self.root)
        self.num_classes = self.info["num_classes"]
        self.device = resolve_device(cfg)
        # paths under data.root, or URLs from data.shard_url (outputs stay local files)
        self.train_shards = split_shards(self.root, cfg.data.train_split, self.info, cfg.data.shard_url)
        self.num_train = self.info["splits"][cfg.data.train_split]["count"]

    def marker(self, stage: str) -> Path:
        return self.out / "stages" / f"{stage}.json"

    def done(self, stage: str) -> bool:
        return self.marker(stage).is_file()

    def finish(self, stage: str, summary: dict) -> None:
        if is_main_process():   # under torchrun every rank runs the stage; one marks it done
            atomic_write_json(self.marker(stage), summary)
            # eval and report read every earlier stage's outputs: a stage (re)done after them
            # (say train-seg run after eval) makes them stale, so they run again
            for later in {"eval": ["report"], "report": []}.get(stage, ["eval", "report"]):
                self.marker(later).unlink(missing_ok=True)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def load_weights(model, path: Path):
    from .engine import load_checkpoint
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the stage that trains it first")
    model.load_state_dict(load_checkpoint(path)["model"])
    return model


def classifier(run: Run):
    from .models import build_classifier
    return load_weights(build_classifier(run.cfg.model, run.num_classes), run.out / "cls" / "checkpoint.pth")


# ----------------------------------------------------------------------------- stages
def stage_train(run: Run, kind: str) -> dict:
    """A trainer, started by its configured launcher (inline, torchrun, local or SLURM job)."""
    from .submit import launch_training
    return launch_training(run.cfg, kind)


def stage_labels(run: Run, stage: str) -> dict:
    """A label-generation stage over the train shards: on Ray actors (default), or in this process
    with ``ray.enabled=false``. Either way, shards whose output exists are skipped."""
    from .ray_labels import STAGE_DIRS, LabelWorker, ShardedLabelJob, ensure_ray
    counts = {str(url): s["count"] for url, s in
              zip(run.train_shards, run.info["splits"][run.cfg.data.train_split]["shards"])}
    if run.cfg.ray.enabled and run.cfg.ray.launcher != "inline":
        from .ray_job import submit_label_stage    # a job that brings its own Ray cluster
        return submit_label_stage(run.cfg, stage)
    if run.cfg.ray.enabled:
        ensure_ray(run.cfg.ray, run.cfg.ray.num_cpus or None)
        job = ShardedLabelJob(stage, run.cfg, run.out, run.num_classes, run.cfg.ray.num_actors)
        return job.run(run.train_shards, counts)
    from .progress import Progress
    worker = LabelWorker(stage, run.cfg, str(run.out), run.num_classes, threads=torch.get_num_threads())
    out_dir = run.out / STAGE_DIRS[stage]
    todo = [s for s in run.train_shards if not (out_dir / s.name).is_file()]
    bar = Progress(stage.replace("_", "-"), total=sum(counts[str(s)] for s in todo))
    failed = []
    for shard in todo:
        res = worker.process(str(shard), str(out_dir / shard.name))
        failed += res["failed"]
        bar.update(res["samples"], failed=len(res["failed"]))
    return {**bar.close(f"{len(todo)} shards written to {out_dir}"), "failed": failed}


def stage_eval(run: Run) -> dict:
    from .evaluate import eval_label_shards, eval_segmenter
    from .models import build_segmenter
    cfg, res = run.cfg, {}
    split = cfg.data.train_split
    url = cfg.data.shard_url
    res["cam"] = eval_label_shards(run.root, split, run.out / "cams", "cam", run.num_classes,
                                   cfg.cams.eval_bg_score, shard_url=url)
    res["aff_labels"] = eval_label_shards(run.root, split, run.out / "aff_labels", "aff",
                                          run.num_classes, shard_url=url)
    res["rw"] = eval_label_shards(run.root, split, run.out / "rw", "pseudo", run.num_classes,
                                  shard_url=url)
    res["perfect_walk"] = eval_label_shards(run.root, split, run.out / "cams", "perfect_walk",
                                            run.num_classes, bg_alpha=cfg.random_walk.bg_alpha,
                                            shard_url=url)
    for kind in ["seg"] + (["seg_full"] if cfg.seg_full else []):
        if not (run.out / kind / "checkpoint.pth").is_file():
            print(f"[eval] {kind}: no checkpoint yet (run train-seg), not evaluated", flush=True)
            continue
        model = load_weights(build_segmenter(cfg.model, run.num_classes + 1),
                             run.out / kind / "checkpoint.pth").to(run.device)
        res[kind] = eval_segmenter(model, run.root, cfg.data.val_split, run.num_classes, run.device,
                                   shard_url=url)
    for k, v in res.items():
        print(f"[eval] {k}: mIoU {v['miou']:.1f}" +
              (f", object recall {v['fg_recall']:.2f}, background false positives "
               f"{v['bg_false_pos']:.2f}" if "fg_recall" in v else "") +
              (f" (coverage {v['coverage']:.2f}, precision {v['precision']:.2f})" if "coverage" in v else ""),
              flush=True)
    return res


def run_stage(run: Run, stage: str, force: bool = False) -> dict | None:
    if run.done(stage) and not force:
        print(f"[run] {stage}: done (cached in {run.marker(stage)})", flush=True)
        return None
    t0 = time.monotonic()
    if stage == "train_cls":
        summary = stage_train(run, "cls")
    elif stage == "train_aff":
        summary = stage_train(run, "aff")
    elif stage == "train_seg":
        summary = {"seg": stage_train(run, "seg")}
        if run.cfg.seg_full:
            summary["seg_full"] = stage_train(run, "seg_full")
    elif stage in ("cams", "aff_labels", "random_walk"):
        summary = stage_labels(run, stage)
    elif stage == "eval":
        summary = stage_eval(run)
    elif stage == "report":
        from .report import write_report
        summary = write_report(run)
    else:
        raise ValueError(f"unknown stage {stage!r} (have {STAGES})")
    summary = {"seconds": round(time.monotonic() - t0, 2), **summary}
    run.finish(stage, summary)
    return summary


def check_same_dataset(run: Run, force: bool) -> None:
    """A run directory belongs to one dataset: cached stages made from another one (say, the
    synthetic data generated anew with other settings) must not be reused silently."""
    import hashlib
    digest = hashlib.sha256((run.root / "dataset.json").read_bytes()).hexdigest()
    mark = run.out / "stages" / "dataset.sha256"
    if mark.is_file() and mark.read_text().strip() != digest and not force:
        raise FileExistsError(f"{run.out} holds stages made from another dataset than "
                              f"{run.root} (dataset.json changed): use a new out_dir, or --force")
    if is_main_process():
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.write_text(digest + "\n")


def run_pipeline(cfg: Config, stages: list[str] | None = None, force: bool = False) -> int:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        write_run_info(out, cfg)
    run = Run(cfg)
    check_same_dataset(run, force)
    print(f"[run] {cfg.name}: {run.num_train} train images, {run.num_classes} classes, device "
          f"{run.device}, outputs in {out}", flush=True)
    t0 = time.monotonic()
    for stage in stages or STAGES:
        run_stage(run, stage, force=force)
    print(f"[run] {cfg.name}: finished in {time.monotonic() - t0:.0f}s; report in {out / 'report.md'}",
          flush=True)
    return 0
