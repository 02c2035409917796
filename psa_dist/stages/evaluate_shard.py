"""What the eval stage computes, one shard at a time: a shard's partial result (its confusion
matrix, the counts and per-object recalls the figures need) from :func:`score_label_shard` or
:func:`score_segmenter_shard`, and the figures of a split from the sum of its shards' parts
(:func:`label_result`, :func:`segmenter_result`). Where the shards are scored (the pool of the
eval stage, its part files, resume) is ``evaluate.py``."""
from __future__ import annotations

import numpy as np
import torch

from ..core.affinity import cells_to_pixels
from ..core.cam import cam_to_label
from ..core.image import normalize, pad_to_multiple
from ..core.metrics import (ConfusionMatrix, iou_from_confusion, miou_from_confusion,
                            recall_and_leak, region_recalls)
from ..core.pseudo_labels import perfect_walk_label
from ..data.shards import decode_sample, iter_joined, output_path, split_shards
from . import table


REGION_FIGURES = ("cam", "rw")     # the figures whose per-object recalls lost_objects reads


def label_figures(cfg) -> dict:
    """What each label figure scores under ``cfg.method``: its key in the result -> (the stage
    whose shards it reads, the field). ``aff_labels`` is the labels the method's second network
    learns from (AffinityNet's affinity labels, IRN's relation labels), ``rw`` its pseudo labels."""
    rel, pseudo = table.method_stage(cfg, table.RELATIONS), table.method_stage(cfg, table.PSEUDO)
    return {"cam": ("cams", "cam"), "aff_labels": (rel, table.label_stage(rel).field),
            "rw": (pseudo, "pseudo"), "perfect_walk": ("cams", "perfect_walk")}


def score_label_shard(shard, stage_dir, field: str, num_classes: int, bg_score: float = 0.2,
                      bg_alpha: float = 16.0, regions: bool = False, aff_stride: int = 8,
                      neutral: bool | None = None) -> dict:
    """One train shard's share of a label stage's score against the ground-truth masks: its
    confusion matrix, for ``aff`` its labelled and total pixels, with ``regions`` each object's
    recall (``[key, class, share]``), and ``samples`` (those read). Partial results of all shards
    summed by :func:`label_result` are the figure of the whole split.

    ``field`` "cam": CAMs turned into labels with a constant background score (the paper's CAM
    evaluation); "pseudo": the random-walk labels; "aff": confident-region labels, where neutral
    pixels are left out and the share of labelled pixels is reported as ``coverage`` (the labels
    are on the cell grid of ``aff_stride``, AffinityNet's: each cell's label counts on its pixels);
    "perfect_walk": :func:`perfect_walk_label` of the CAMs (the walk's ceiling on these CAMs).
    ``neutral``: labels with neutral (255) pixels, scored as ``aff`` is (IRN's relation labels,
    at image resolution); by default only ``aff``.
    """
    neutral = field == "aff" if neutral is None else neutral
    cm = ConfusionMatrix(num_classes + 1)
    labelled = total = samples = 0
    recalls = []
    for raw, (lab,) in iter_joined(shard, output_path(stage_dir, shard)):
        samples += 1
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
        if neutral:
            keep = pred != 255
            labelled += int(keep.sum())
            total += pred.numel()
            target = torch.where(keep, target, torch.full_like(target, 255))
            pred = torch.where(keep, pred, torch.zeros_like(pred))
        cm.update(pred, target)
        if regions:
            recalls += [[raw["__key__"], c, r] for c, r in region_recalls(pred, target).items()]
    part = {"confusion": cm.mat.tolist(), "samples": samples}
    if neutral:
        part.update(labelled=labelled, total=total)
    if regions:
        part["regions"] = recalls
    return part


def _summed(parts: list[dict], num_classes: int, what: str) -> torch.Tensor:
    mat = torch.zeros(num_classes + 1, num_classes + 1, dtype=torch.int64)
    for p in parts:
        m = torch.tensor(p["confusion"], dtype=torch.int64)
        if m.shape != mat.shape:
            raise ValueError(f"{what}: a partial result of {p.get('shard', '?')} has a "
                             f"{tuple(m.shape)} confusion matrix, expected {tuple(mat.shape)}")
        mat += m
    return mat


def label_result(parts: list[dict], field: str, num_classes: int) -> tuple[dict, dict]:
    """The figure of a label stage from its shards' partial results (the order does not matter),
    and the per-object recalls ``{(key, class): share}`` (empty unless the parts have them)."""
    mat = _summed(parts, num_classes, field)
    res = {"miou": miou_from_confusion(mat), "iou": [float(v) for v in iou_from_confusion(mat)],
           "confusion": mat.tolist(), **recall_and_leak(mat)}
    if parts and "labelled" in parts[0]:          # labels with neutral pixels: their coverage
        labelled = sum(p["labelled"] for p in parts)
        res["coverage"] = labelled / max(sum(p["total"] for p in parts), 1)
        res["precision"] = float(mat.diag().sum()) / max(float(mat.sum()), 1.0)
    regions = {(k, c): r for p in parts for k, c, r in p.get("regions", [])}
    return res, regions


def eval_label_shards(root, split, stage_dir, field: str, num_classes: int,
                      bg_score: float = 0.2, bg_alpha: float = 16.0,
                      shard_url: str | None = None, aff_stride: int = 8) -> dict:
    """A label stage's figure over ``split``, shard after shard in this process (``psa-dist
    label`` scores another dataset's labels so); the eval stage runs the same
    :func:`score_label_shard` on the pool (``evaluate.py``)."""
    parts = [score_label_shard(shard, stage_dir, field, num_classes, bg_score, bg_alpha,
                               aff_stride=aff_stride)
             for shard in split_shards(root, split, url=shard_url)]
    return label_result(parts, field, num_classes)[0]


@torch.inference_mode()
def score_segmenter_shard(model, shard, num_classes: int, device="cpu") -> dict:
    """One shard's share of a segmenter's score: single-scale prediction at image resolution on
    every masked image; its confusion matrix and ``samples``."""
    model.eval()
    cm = ConfusionMatrix(num_classes + 1)
    samples = 0
    for raw, _ in iter_joined(shard):
        samples += 1
        s = decode_sample(raw, ["image", "mask"])
        if "mask" not in s:
            continue
        x = normalize(torch.from_numpy(s["image"])[None].to(device))
        h, w = x.shape[-2:]
        logits = model(pad_to_multiple(x, 8))[..., :h, :w]
        cm.update(logits.argmax(1)[0].cpu(), torch.from_numpy(s["mask"].astype(np.int64)))
    return {"confusion": cm.mat.tolist(), "samples": samples}


def segmenter_result(parts: list[dict], num_classes: int) -> dict:
    mat = _summed(parts, num_classes, "segmenter")
    return {"miou": miou_from_confusion(mat), "iou": [float(v) for v in iou_from_confusion(mat)],
            "confusion": mat.tolist()}


def print_results(res: dict) -> None:
    """One line per figure, as the eval stage's log shows them."""
    for name, v in res.items():
        print(f"[eval] {name}: mIoU {v['miou']:.1f}" +
              (f", object recall {v['fg_recall']:.2f}, background false positives "
               f"{v['bg_false_pos']:.2f}" if "fg_recall" in v else "") +
              (f" (coverage {v['coverage']:.2f}, precision {v['precision']:.2f})"
               if "coverage" in v else "") +
              (f"; objects lost {100 * v['objects']['lost']:.1f}%" if "objects" in v else "") +
              (f", found by the CAM and lost by the walk {100 * v['objects']['dropped']:.1f}%"
               if "dropped" in v.get("objects", {}) else ""), flush=True)
