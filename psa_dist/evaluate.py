"""mIoU of every stage: CAMs and pseudo labels on the train split, segmenters on val."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .cam import cam_to_label, rw_inputs, rw_to_label
from .labelgen import output_path
from .metrics import ConfusionMatrix
from .models import normalize
from .shards import decode_sample, iter_joined, split_shards


def perfect_walk_label(cams: torch.Tensor, class_ids, gt: torch.Tensor,
                       bg_alpha: float = 16.0) -> torch.Tensor:
    """What a random walk with a perfect affinity would make of these CAMs: W = 1 inside each
    ground-truth region (one per label value) and 0 across, walked to convergence, replaces every
    input map (background ``(1 - max)^bg_alpha`` and the CAMs) by its mean over the region; then
    the walk's argmax. A diagnostic of the CAMs (how much a walk could recover from them), not of
    AffinityNet: it reads the ground truth."""
    maps = rw_inputs(cams, bg_alpha)
    out = torch.empty_like(maps)
    for r in gt.unique():
        inside = gt == r
        out[:, inside] = maps[:, inside].mean(dim=1, keepdim=True)
    return rw_to_label(out, class_ids)


def eval_label_shards(root, split, stage_dir, field: str, num_classes: int,
                      bg_score: float = 0.2, bg_alpha: float = 16.0,
                      shard_url: str | None = None) -> dict:
    """Score a stage's outputs against the ground-truth masks of ``split``.

    ``field`` "cam": CAMs turned into labels with a constant background score (the paper's CAM
    evaluation); "pseudo": the random-walk labels; "aff": confident-region labels, where neutral
    pixels are left out and the share of labelled pixels is reported as ``coverage``;
    "perfect_walk": :func:`perfect_walk_label` of the CAMs (the walk's ceiling on these CAMs).
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
                keep = pred != 255
                labelled += int(keep.sum())
                total += pred.numel()
                target = torch.where(keep, target, torch.full_like(target, 255))
                pred = torch.where(keep, pred, torch.zeros_like(pred))
            cm.update(pred, target)
    res = {"miou": cm.miou(), "iou": [float(v) for v in cm.iou()], "confusion": cm.mat.tolist(),
           **recall_and_leak(cm.mat)}
    if field == "aff":
        res["coverage"] = labelled / max(total, 1)
        res["precision"] = float(cm.mat.diag().sum()) / max(float(cm.mat.sum()), 1.0)
    return res


def recall_and_leak(mat: torch.Tensor) -> dict:
    """The benchmark's diagnostics: share of object pixels labelled with their own class
    (``fg_recall``) and share of background pixels labelled as some object (``bg_false_pos``)."""
    m = mat.double()
    fg = m[1:].sum()
    return {"fg_recall": float(m[1:, 1:].diag().sum() / fg) if fg > 0 else float("nan"),
            "bg_false_pos": float(m[0, 1:].sum() / m[0].sum()) if m[0].sum() > 0 else float("nan")}


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
            ph, pw = (-h) % 8, (-w) % 8
            logits = model(F.pad(x, (0, pw, 0, ph)))[..., :h, :w]
            cm.update(logits.argmax(1)[0].cpu(), torch.from_numpy(s["mask"].astype(np.int64)))
    return {"miou": cm.miou(), "iou": [float(v) for v in cm.iou()], "confusion": cm.mat.tolist()}
