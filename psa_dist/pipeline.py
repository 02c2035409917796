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

import time
from pathlib import Path

import torch

from .config import Config, config_to_dict
from .runinfo import write_run_info
from .shards import atomic_write_json, read_dataset_json, split_shards

STAGES = ["train_cls", "cams", "aff_labels", "train_aff", "random_walk", "train_seg", "eval", "report"]


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
        self.train_shards = split_shards(self.root, cfg.data.train_split, self.info)
        self.num_train = self.info["splits"][cfg.data.train_split]["count"]

    def marker(self, stage: str) -> Path:
        return self.out / "stages" / f"{stage}.json"

    def done(self, stage: str) -> bool:
        return self.marker(stage).is_file()

    def finish(self, stage: str, summary: dict) -> None:
        atomic_write_json(self.marker(stage), summary)


def load_weights(model, path: Path):
    from .engine import load_checkpoint
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the stage that trains it first")
    model.load_state_dict(load_checkpoint(path)["model"])
    return model


def classifier(run: Run):
    from .models import build_classifier
    return load_weights(build_classifier(run.cfg.model, run.num_classes), run.out / "cls" / "checkpoint.pth")


def affinitynet(run: Run):
    from .backbones import build_backbone
    from .models import AffinityNet
    net = AffinityNet(build_backbone(run.cfg.model.backbone), tuple(run.cfg.model.aff_dims))
    return load_weights(net, run.out / "aff" / "checkpoint.pth")


# ----------------------------------------------------------------------------- stages
def stage_train(run: Run, kind: str) -> dict:
    from .engine import train
    from .models import AffinityNet, build_classifier, build_segmenter
    from .train_data import make_train_loader
    cfg = run.cfg
    torch.manual_seed(cfg.seed)
    tcfg = {"cls": cfg.train_cls, "aff": cfg.train_aff, "seg": cfg.train_seg,
            "seg_full": cfg.train_seg}[kind]
    labels = {"aff": "aff_labels", "seg": "rw"}.get(kind)
    label_urls = [run.out / labels / s.name for s in run.train_shards] if labels else None
    if kind != "aff" and not cfg.model.pretrained:
        print(f"[{kind}] backbone {cfg.model.backbone}: no pretrained weights (model.pretrained "
              f"unset), training from random initialisation", flush=True)
    if kind == "cls":
        model = build_classifier(cfg.model, run.num_classes)
    elif kind == "aff":
        model = AffinityNet.from_classifier(classifier(run), tuple(cfg.model.aff_dims))
    else:
        model = build_segmenter(cfg.model, run.num_classes + 1)
    model.to(run.device)
    loader = make_train_loader(kind, run.train_shards, label_urls, run.num_classes, tcfg,
                               run.num_train, seed=cfg.seed)
    return train(model, kind, loader, tcfg, run.out / kind, run.device, model.new_modules(),
                 freeze_bn=cfg.model.freeze_bn, radius=cfg.random_walk.radius,
                 config_dict=config_to_dict(cfg))


def _per_shard(run: Run, stage_dir: str, name: str, fn) -> dict:
    """Run ``fn(in_shard, out_shard)`` over the train shards whose output is missing."""
    from .progress import Progress
    out_dir = run.out / stage_dir
    bar = Progress(name, total=run.num_train)
    summaries, failed = [], []
    for shard in run.train_shards:
        out = out_dir / shard.name
        if out.is_file():
            continue
        s = fn(shard, out)
        summaries.append({k: v for k, v in s.items() if k != "failed"})
        failed += s["failed"]
        bar.update(s["samples"], failed=len(s["failed"]))
    stats = bar.close(f"{len(summaries)} shards written to {out_dir}")
    return {"shards": summaries, "failed": failed, **stats}


def stage_cams(run: Run) -> dict:
    from .labelgen import cam_shard
    model = classifier(run).to(run.device).eval()
    c = run.cfg.cams
    return _per_shard(run, "cams", "cams", lambda i, o: cam_shard(
        model, i, o, run.num_classes, tuple(c.scales), c.flip, run.device, c.batch_size))


def stage_aff_labels(run: Run) -> dict:
    from .labelgen import aff_label_shard
    a = run.cfg.aff_labels
    crf = None
    if a.crf:
        crf = {"iters": a.crf_iters, "gauss_sxy": a.crf_gauss_sxy, "gauss_compat": a.crf_gauss_compat,
               "bi_sxy": a.crf_bi_sxy, "bi_srgb": a.crf_bi_srgb, "bi_compat": a.crf_bi_compat}
    return _per_shard(run, "aff_labels", "aff-labels", lambda i, o: aff_label_shard(
        i, run.out / "cams" / i.name, o, a.alpha_lo, a.alpha_hi, crf))


def stage_random_walk(run: Run) -> dict:
    from .labelgen import rw_shard
    model = affinitynet(run).to(run.device).eval()
    r = run.cfg.random_walk
    return _per_shard(run, "rw", "random-walk", lambda i, o: rw_shard(
        model, i, run.out / "cams" / i.name, o, r.beta, r.t, r.radius, r.bg_alpha, run.device))


def stage_eval(run: Run) -> dict:
    from .evaluate import eval_label_shards, eval_segmenter
    from .models import build_segmenter
    cfg, res = run.cfg, {}
    split = cfg.data.train_split
    res["cam"] = eval_label_shards(run.root, split, run.out / "cams", "cam", run.num_classes,
                                   cfg.cams.eval_bg_score)
    res["aff_labels"] = eval_label_shards(run.root, split, run.out / "aff_labels", "aff", run.num_classes)
    res["rw"] = eval_label_shards(run.root, split, run.out / "rw", "pseudo", run.num_classes)
    for kind in ["seg"] + (["seg_full"] if cfg.seg_full else []):
        model = load_weights(build_segmenter(cfg.model, run.num_classes + 1),
                             run.out / kind / "checkpoint.pth").to(run.device)
        res[kind] = eval_segmenter(model, run.root, cfg.data.val_split, run.num_classes, run.device)
    for k, v in res.items():
        print(f"[eval] {k}: mIoU {v['miou']:.1f}" +
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
    elif stage == "cams":
        summary = stage_cams(run)
    elif stage == "aff_labels":
        summary = stage_aff_labels(run)
    elif stage == "random_walk":
        summary = stage_random_walk(run)
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


def run_pipeline(cfg: Config, stages: list[str] | None = None, force: bool = False) -> int:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_run_info(out, cfg)
    run = Run(cfg)
    print(f"[run] {cfg.name}: {run.num_train} train images, {run.num_classes} classes, device "
          f"{run.device}, outputs in {out}", flush=True)
    t0 = time.monotonic()
    for stage in stages or STAGES:
        run_stage(run, stage, force=force)
    print(f"[run] {cfg.name}: finished in {time.monotonic() - t0:.0f}s; report in {out / 'report.md'}",
          flush=True)
    return 0
