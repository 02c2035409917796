"""report.json, report.md and per-sample panels of a finished run."""
from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import torch
from PIL import Image

from ..core.image import normalize, pad_to_multiple
from ..core.metrics import LOST_BELOW
from ..data.dataset_view import colorize
from ..data.shards import decode_sample, iter_joined, output_path
from ..util.atomic import atomic_write_bytes, atomic_write_json
from . import table
from .model_factory import load_trained
from .run_dir import RunDir

PANEL_SAMPLES = 4
STAGE_NAMES = {"cam": "CAM (train)", "rw": "CAM + random walk (train)",
               "seg": "segmenter on pseudo labels (val)", "seg_full": "segmenter, full supervision (val)"}


def _heat(cam: np.ndarray) -> np.ndarray:
    """Max over classes as a blue-to-red heat map."""
    m = cam.max(0) if cam.size else np.zeros(cam.shape[1:])
    m = np.clip(m, 0, 1)
    return np.stack([255 * m, 255 * (1 - np.abs(2 * m - 1)), 255 * (1 - m)], -1).astype(np.uint8)


def panels(run, seg_model=None, count: int = PANEL_SAMPLES) -> list[str]:
    """PNG per sample: image | ground truth | CAM heat | affinity labels | pseudo label | segmenter."""
    out_dir = run.out / "panels"
    pal = run.info["palette"]
    shard = run.train_shards[0]
    written = []
    rel = table.label_stage(table.method_stage(run.cfg, table.RELATIONS))
    streams = [output_path(run.stage_dir(d), shard)
               for d in ("cams", rel.name, table.method_stage(run.cfg, table.PSEUDO))]
    for raw, (cam, aff, rw) in iter_joined(shard, *streams):
        s = decode_sample(raw, ["image", "cls", "mask"])
        labels = rel.exported(decode_sample(aff, [rel.field])[rel.field], s["image"].shape[:2],
                              run.cfg)              # affinity labels on the pixels
        row = [s["image"], colorize(s.get("mask", np.zeros(s["image"].shape[:2], np.uint8)), pal),
               _heat(decode_sample(cam, ["cam"])["cam"].astype(np.float32)),
               colorize(labels.astype(np.uint8), pal),
               colorize(decode_sample(rw, ["pseudo"])["pseudo"], pal)]
        if seg_model is not None:
            with torch.inference_mode():
                x = normalize(torch.from_numpy(s["image"])[None].to(run.device))
                h, w = x.shape[-2:]
                logits = seg_model(pad_to_multiple(x, 8))[..., :h, :w]
            row.append(colorize(logits.argmax(1)[0].cpu().numpy().astype(np.uint8), pal))
        gap = np.full((s["image"].shape[0], 4, 3), 255, np.uint8)
        img = np.concatenate([x for r in row for x in (r, gap)][:-1], 1)
        path = out_dir / f"{s['key']}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        atomic_write_bytes(path, buf.getvalue())
        written.append(str(path.relative_to(run.out)))
        if len(written) >= count:
            break
    return written


def final_losses(out, models=None) -> dict:
    """Each trainer's loss over its last epoch (from its log.jsonl), as a check on the schedules:
    a classifier still far from converged leaves faint objects out of the CAMs, and everything
    after inherits it (docs/benchmark.md, round 8)."""
    res = {}
    for model in models or table.MODELS:
        log = RunDir(out).train_log(model)
        if not log.is_file():
            continue
        epochs = []
        for line in log.read_text().splitlines():
            try:                # a line cut short by a kill before a resume is passed over
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "epoch_seconds" in rec:
                epochs.append(rec)
        if epochs:
            res[model] = round(epochs[-1]["loss"], 4)
    return res


def stopping_epochs(run) -> dict:
    """For each model trained with ``stop_patience``: the epochs it ran, the epoch whose weights it
    kept (the best held-out loss) and the held-out curve; with ``fit_target``: the epochs it ran,
    the epoch it fit its labels after, the labels' prior loss and the training curve; from its
    stage's marker. Epochs are counted from 1."""
    res = {}
    for model, m in table.MODELS.items():
        if not run.done(m.stage):
            continue
        marker = run.summary(m.stage)
        s = marker[model] if isinstance(marker.get(model), dict) else marker
        if "best_epoch" in s:
            res[model] = {"run": s["epochs_run"], "best": s["best_epoch"],
                          "heldout_loss": s["heldout_loss"]}
        elif "fit_epoch" in s:
            res[model] = {"run": s["epochs_run"], "fit": s["fit_epoch"],
                          "prior_loss": s["prior_loss"], "train_loss": s["train_loss"],
                          **({"class_prior_loss": s["class_prior_loss"],
                              "class_train_loss": s["class_train_loss"]}
                             if "class_prior_loss" in s else {})}
    return res


def _cams_stamp(run) -> str:
    """What the CAMs were: their marker's digest (a redo of the classifier or the CAMs rewrites it)."""
    return hashlib.sha256(run.marker("cams").read_bytes()).hexdigest()[:16] \
        if run.marker("cams").is_file() else ""


def method_summary(report: dict, ev: dict, run) -> dict:
    """One method's figures on this run's CAMs, as the report keeps them for a side-by-side view:
    the pseudo labels against the CAM, the labels its network learns from, the segmenter, and the
    seconds of the stages after the CAMs."""
    rel = table.label_stage(table.method_stage(run.cfg, table.RELATIONS)).report_name
    own = [s for s in table.stages_of(run.cfg) if not table.shared(s) and s not in ("eval", "report")]
    m = report["miou"]
    return {"cams": _cams_stamp(run), "cam": m.get("cam"), "walk": m.get("rw"),
            "walk_gain": report.get("rw_gain"),
            "cam_recall": round(ev["cam"]["fg_recall"], 4) if "cam" in ev else None,
            "walk_recall": round(ev["rw"]["fg_recall"], 4) if "rw" in ev else None,
            "labels": rel, "labels_coverage": report[rel]["coverage"],
            "labels_precision": report[rel]["precision"],
            "seg": m.get("seg"), "seg_full": m.get("seg_full"),
            "seg_vs_full": report.get("seg_vs_full"),
            "seconds": round(sum(report["stage_seconds"].get(s, 0.0) for s in own), 1)}


def _other_methods(run) -> dict:
    """The other methods' summaries the previous report.json of this run directory holds, those
    made on the same CAMs (a method switch keeps the classifier and the CAMs)."""
    path = run.out / "report.json"
    try:
        old = json.loads(path.read_text()).get("methods", {}) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}
    stamp = _cams_stamp(run)
    return {k: v for k, v in old.items() if k != run.cfg.method and v.get("cams") == stamp}


def write_report(run) -> dict:
    ev = run.summary("eval")
    rel = table.label_stage(table.method_stage(run.cfg, table.RELATIONS))
    classes = run.info["classes"]
    keys = [k for k in ("cam", "rw", "seg", "seg_full") if k in ev]
    report = {
        "miou": {k: round(ev[k]["miou"], 2) for k in keys},
        "per_class": {k: [round(100 * v, 2) if v == v else None for v in ev[k]["iou"]] for k in keys},
        "classes": ["background"] + classes,
        rel.report_name: {k: round(ev["aff_labels"][k], 4)
                          for k in ("coverage", "precision", "miou")},
        "stage_seconds": {},
    }
    if "perfect_walk" in ev:    # the walk's ceiling on these CAMs (reads the ground truth)
        report["perfect_walk"] = {k: round(ev["perfect_walk"][k], 4)
                                  for k in ("miou", "fg_recall", "bg_false_pos")}
    for stage in table.ORDER:
        if stage != "report" and run.done(stage):
            report["stage_seconds"][stage] = run.summary(stage)["seconds"]
    report["final_loss"] = final_losses(run.out, [m for s in table.stages_of(run.cfg)
                                                  for m in table.models_trained(run.cfg, s)])
    if "objects" in ev.get("rw", {}):      # per object: lost by the CAM, by the walk
        report["objects"] = {"cam_lost": round(ev["cam"]["objects"]["lost"], 4),
                             "walk_lost": round(ev["rw"]["objects"]["lost"], 4),
                             "walk_dropped": round(ev["rw"]["objects"]["dropped"], 4)}
    report["epochs"] = stopping_epochs(run)
    seg = load_trained(run, "seg") if run.checkpoint("seg").is_file() else None
    report["panels"] = panels(run, seg)
    if "cam" in report["miou"] and "rw" in report["miou"]:
        report["rw_gain"] = round(report["miou"]["rw"] - report["miou"]["cam"], 2)
    if "seg" in report["miou"] and report["miou"].get("seg_full"):
        report["seg_vs_full"] = round(report["miou"]["seg"] / report["miou"]["seg_full"], 3)
    report["method"] = run.cfg.method
    report["methods"] = {**_other_methods(run), run.cfg.method: method_summary(report, ev, run)}
    atomic_write_json(run.out / "report.json", report)
    atomic_write_bytes(run.out / "report.md", markdown(report, run.cfg.name).encode())
    return {"miou": report["miou"]}


def markdown(report: dict, name: str) -> str:
    names = report["classes"]
    keys = list(report["miou"])
    lines = [f"# psa-dist report: {name}", "",
             "Per-class IoU (%), laid out like the paper's per-class table.", "",
             "| stage | " + " | ".join(names) + " | mIoU |",
             "|---|" + "---|" * (len(names) + 1)]
    for k in keys:
        cells = ["-" if v is None else f"{v:.1f}" for v in report["per_class"][k]]
        lines.append(f"| {STAGE_NAMES[k]} | " + " | ".join(cells) + f" | **{report['miou'][k]:.1f}** |")
    lines.append("")
    if "rw_gain" in report:
        lines.append(f"Random walk gain over the CAM: **{report['rw_gain']:+.1f}** mIoU points.")
    if "seg_vs_full" in report:
        lines.append(f"Segmenter on pseudo labels / fully supervised: **{100 * report['seg_vs_full']:.0f}%**.")
    if "perfect_walk" in report:
        lines.append(f"A walk with a perfect affinity (1 inside each ground-truth region, 0 across) "
                     f"would reach **{report['perfect_walk']['miou']:.1f}** on these CAMs: the "
                     f"ceiling of what AffinityNet can recover.")
    if "objects" in report:
        o = report["objects"]
        lines.append(f"Objects lost (under {int(100 * LOST_BELOW)}% of their pixels labelled "
                     f"with their class): CAM {100 * o['cam_lost']:.1f}%, walk "
                     f"{100 * o['walk_lost']:.1f}%; of the objects the CAM found, the walk lost "
                     f"{100 * o['walk_dropped']:.1f}%.")
    if len(report.get("methods", {})) > 1:
        lines += ["", *methods_table(report["methods"]), ""]
    what = "affinity_labels" if "affinity_labels" in report else "relation_labels"
    a = report[what]
    lines += [f"{what.replace('_', ' ').capitalize()}: {100 * a['coverage']:.0f}% of pixels "
              f"confident, "
              f"{100 * a['precision']:.0f}% of those correct.", "",
              "Seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in report["stage_seconds"].items()),
              "", "Training loss over the last epoch: " + ", ".join(
                  f"{k} {v:.3f}" for k, v in report.get("final_loss", {}).items()),
              *(["", "Stopped when learned: " + "; ".join(
                  f"{k} kept epoch {v['best']} of {v['run']} (the best held-out loss)"
                  if "best" in v else
                  (f"{k} fit its labels{' class by class' if 'class_prior_loss' in v else ''} "
                   f"after epoch {v['fit']}, {v['run']} epochs run "
                   f"(prior loss {v['prior_loss']:.3f})" if v["fit"] is not None else
                   f"{k} never fit its labels ({v['run']} epochs, the cap)")
                  for k, v in report["epochs"].items())]
                if report.get("epochs") else []),
              "", "## Samples", "",
              f"image | ground truth | CAM | {what.replace('_', ' ')} (neutral in beige) | "
              f"random-walk label | segmenter",
              ""]
    lines += [f"![{p}]({p})" for p in report["panels"]]
    return "\n".join(lines) + "\n"


METHOD_NAMES = {"psa": "AffinityNet (psa)", "irn": "IRN (irn)"}


def methods_table(methods: dict) -> list[str]:
    """Both methods on the same CAMs, a row each (the report of a run that switched methods)."""
    def pct(v):
        return "-" if v is None else f"{100 * v:.0f}%"

    def num(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)
    lines = ["## The methods run on these CAMs", "",
             "| method | CAM | pseudo labels | gain | recall CAM → pseudo | labels its network "
             "learns from: coverage, precision | segmenter / full | seconds after the CAMs |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in methods.items():
        lines.append(
            f"| {METHOD_NAMES.get(name, name)} | {num(m['cam'])} | {num(m['walk'])} | "
            f"{num(m['walk_gain'], '{:+.1f}')} | {num(m['cam_recall'], '{:.3f}')} → "
            f"{num(m['walk_recall'], '{:.3f}')} | {m['labels'].replace('_', ' ')}: "
            f"{pct(m['labels_coverage'])}, {pct(m['labels_precision'])} | {num(m['seg'])} / "
            f"{num(m['seg_full'])} = {pct(m['seg_vs_full'])} | {m['seconds']:.0f} |")
    return lines
