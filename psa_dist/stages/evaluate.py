"""mIoU of every stage: CAMs and pseudo labels on the train split, segmenters on val."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..core.affinity import cells_to_pixels
from ..core.cam import cam_to_label
from ..core.image import normalize, pad_to_multiple
from ..core.metrics import ConfusionMatrix, lost_objects, recall_and_leak, region_recalls
from ..core.pseudo_labels import perfect_walk_label
from ..data.shards import decode_sample, iter_joined, output_path, split_shards
from .run_dir import Run
from .trained import load_trained


def eval_label_shards(root, split, stage_dir, field: str, num_classes: int,
                      bg_score: float = 0.2, bg_alpha: float = 16.0,
                      shard_url: str | None = None, regions: dict | None = None,
                      aff_stride: int = 8) -> dict:
    """Score a stage's outputs against the ground-truth masks of ``split``.

    ``field`` "cam": CAMs turned into labels with a constant background score (the paper's CAM
    evaluation); "pseudo": the random-walk labels; "aff": confident-region labels, where neutral
    pixels are left out and the share of labelled pixels is reported as ``coverage`` (the labels
    are on the cell grid of ``aff_stride``, AffinityNet's: each cell's label counts on its pixels);
    "perfect_walk": :func:`perfect_walk_label` of the CAMs (the walk's ceiling on these CAMs).
    ``regions`` (a dict): filled with each object's recall, ``{(key, class): share}``.
    """
    cm = ConfusionMatrix(num_classes + 1)
    labelled = total = 0
    for shard in split_shards(root, split, url=shard_url):
        for raw, (lab,) in iter_joined(shard, output_path(stage_dir, shard)):
            gt = decode_sample(raw, ["mask"]).get("mask")
            if gt is None:
                continue
            out = decode_sample(lab, ["cam" if field == "perfect_walk" else field])
            target = torch.from_numpy(gt.astype(np.int64))
            if field == "perfect_walk":
                pred = perfect_walk_label(torch.from_numpy(out["cam"].astype(np.float32)),
                                          decode_sample(raw, ["cls"])["cls"], target, bg_alpha)
            elif field == "cam":
                pred = cam_to_label(torch.from_numpy(out["cam"].astype(np.float32)),
                                    decode_sample(raw, ["cls"])["cls"], bg_score)
            else:
                pred = torch.from_numpy(out[field].astype(np.int64))
            if field == "aff":
                try:
                    pred = cells_to_pixels(pred, *target.shape, aff_stride)
                except ValueError as e:
                    raise ValueError(f"{output_path(stage_dir, shard)}: sample {raw['__key__']}: "
                                     f"{e} (model.aff_stride={aff_stride}); labels from another "
                                     f"stride or an older version: rerun aff-labels") from None
                keep = pred != 255
                labelled += int(keep.sum())
                total += pred.numel()
                target = torch.where(keep, target, torch.full_like(target, 255))
                pred = torch.where(keep, pred, torch.zeros_like(pred))
            cm.update(pred, target)
            if regions is not None:
                for c, r in region_recalls(pred, target).items():
                    regions[(raw["__key__"], c)] = r
    res = {"miou": cm.miou(), "iou": [float(v) for v in cm.iou()], "confusion": cm.mat.tolist(),
           **recall_and_leak(cm.mat)}
    if field == "aff":
        res["coverage"] = labelled / max(total, 1)
        res["precision"] = float(cm.mat.diag().sum()) / max(float(cm.mat.sum()), 1.0)
    return res


@torch.inference_mode()
def eval_segmenter(model, root, split, num_classes: int, device="cpu", batch_size: int = 8,
                   shard_url: str | None = None) -> dict:
    """Single-scale prediction at image resolution on every image of ``split``."""
    model.eval()
    cm = ConfusionMatrix(num_classes + 1)
    for shard in split_shards(root, split, url=shard_url):
        for raw, _ in iter_joined(shard):
            s = decode_sample(raw, ["image", "mask"])
            if "mask" not in s:
                continue
            x = normalize(torch.from_numpy(s["image"])[None].to(device))
            h, w = x.shape[-2:]
            logits = model(pad_to_multiple(x, 8))[..., :h, :w]
            cm.update(logits.argmax(1)[0].cpu(), torch.from_numpy(s["mask"].astype(np.int64)))
    return {"miou": cm.miou(), "iou": [float(v) for v in cm.iou()], "confusion": cm.mat.tolist()}


def run_eval(run: Run) -> dict:
    """The eval stage: every label stage's outputs and the walk's ceiling on the train split, and
    each trained segmenter on the val split."""
    cfg, res = run.cfg, {}
    split, url, k = cfg.data.train_split, cfg.data.shard_url, run.num_classes
    cam_regions, walk_regions = {}, {}
    res["cam"] = eval_label_shards(run.root, split, run.stage_dir("cams"), "cam", k,
                                   cfg.cams.eval_bg_score, shard_url=url, regions=cam_regions)
    res["aff_labels"] = eval_label_shards(run.root, split, run.stage_dir("aff_labels"), "aff", k,
                                          shard_url=url, aff_stride=cfg.model.aff_stride)
    res["rw"] = eval_label_shards(run.root, split, run.stage_dir("random_walk"), "pseudo", k,
                                  shard_url=url, regions=walk_regions)
    # per object: lost by the CAM, by the walk, and found by the CAM but lost by the walk
    res["cam"]["objects"] = lost_objects(cam_regions)
    res["rw"]["objects"] = lost_objects(walk_regions, cam_regions)
    res["perfect_walk"] = eval_label_shards(run.root, split, run.stage_dir("cams"), "perfect_walk",
                                            k, bg_alpha=cfg.random_walk.bg_alpha, shard_url=url)
    for model in ["seg"] + (["seg_full"] if cfg.seg_full else []):
        if not run.checkpoint(model).is_file():
            print(f"[eval] {model}: no checkpoint yet (run train-seg), not evaluated", flush=True)
            continue
        res[model] = eval_segmenter(load_trained(run, model), run.root, cfg.data.val_split, k,
                                    run.device, shard_url=url)
    for name, v in res.items():
        print(f"[eval] {name}: mIoU {v['miou']:.1f}" +
              (f", object recall {v['fg_recall']:.2f}, background false positives "
               f"{v['bg_false_pos']:.2f}" if "fg_recall" in v else "") +
              (f" (coverage {v['coverage']:.2f}, precision {v['precision']:.2f})"
               if "coverage" in v else "") +
              (f"; objects lost {100 * v['objects']['lost']:.1f}%" if "objects" in v else "") +
              (f", found by the CAM and lost by the walk {100 * v['objects']['dropped']:.1f}%"
               if "dropped" in v.get("objects", {}) else ""), flush=True)
    return res


def per_class_markdown(names: list[str], iou: list[float], title: str) -> str:
    """The per-class IoU (%) table of one prediction, as report.md lays it out."""
    cells = ["-" if v != v else f"{100 * v:.1f}" for v in iou]
    miou = 100 * float(np.nanmean(iou)) if len(iou) else float("nan")
    return "\n".join([f"# {title}", "", "| " + " | ".join(names) + " | mIoU |",
                      "|---|" + "---|" * len(names),
                      "| " + " | ".join(cells) + f" | **{miou:.1f}** |", ""])


def score_predictions(root, split: str, pred_dir, num_classes: int, names: list[str]) -> dict | None:
    """Index PNGs ``pred_dir/<key>.png`` against the masks of ``split`` of the dataset at ``root``
    (None when it has no masks): mIoU, per-class IoU, the confusion matrix and a markdown table.
    A prediction missing for a masked image is an error that names it."""
    cm = ConfusionMatrix(num_classes + 1)
    scored = 0
    for shard in split_shards(root, split):
        for raw, _ in iter_joined(shard):
            gt = decode_sample(raw, ["mask"]).get("mask")
            if gt is None:
                continue
            path = Path(pred_dir) / f"{raw['__key__']}.png"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no prediction for {raw['__key__']} of {shard}")
            with Image.open(path) as im:
                pred = np.asarray(im)
            cm.update(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(gt.astype(np.int64)))
            scored += 1
    if not scored:
        return None
    iou = [float(v) for v in cm.iou()]
    return {"miou": cm.miou(), "iou": iou, "classes": names, "images": scored,
            "confusion": cm.mat.tolist(),
            "markdown": per_class_markdown(names, iou, f"Predictions on {root} ({split})")}
