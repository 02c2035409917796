"""Confusion matrix, per-class IoU and mIoU. Across processes a matrix is summed with one
all_reduce by the caller (``util.dist.all_reduce_sum(cm.mat)``): ``core`` touches no process group."""
from __future__ import annotations

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """(K, K) int64 counts, rows = ground truth, columns = prediction; ``ignore_index`` pixels skipped.
    ``num_classes`` counts background (K = C + 1)."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = target != ignore_index
    if (pred[keep] >= num_classes).any() or (target[keep] >= num_classes).any():
        raise ValueError(f"labels outside 0..{num_classes - 1} (and {ignore_index} for ignore)")
    idx = target[keep] * num_classes + pred[keep]
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


class ConfusionMatrix:
    """Accumulates a confusion matrix (``mat``, int64: summed over processes in one all_reduce by
    ``util.dist.all_reduce_sum``)."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device=None):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.mat += confusion_matrix(pred.to(self.mat.device), target.to(self.mat.device),
                                     self.num_classes, self.ignore_index)

    def iou(self) -> torch.Tensor:
        return iou_from_confusion(self.mat)

    def miou(self) -> float:
        return miou_from_confusion(self.mat)


def iou_from_confusion(mat: torch.Tensor) -> torch.Tensor:
    """Per-class IoU = TP / (TP + FP + FN); NaN for a class absent from both prediction and truth."""
    mat = mat.double()
    tp = mat.diag()
    union = mat.sum(0) + mat.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def miou_from_confusion(mat: torch.Tensor) -> float:
    """Mean IoU over classes that occur (in prediction or truth), in percent."""
    return float(torch.nanmean(iou_from_confusion(mat)) * 100)


def recall_and_leak(mat: torch.Tensor) -> dict:
    """The benchmark's diagnostics: share of object pixels labelled with their own class
    (``fg_recall``) and share of background pixels labelled as some object (``bg_false_pos``)."""
    m = mat.double()
    fg = m[1:].sum()
    return {"fg_recall": float(m[1:, 1:].diag().sum() / fg) if fg > 0 else float("nan"),
            "bg_false_pos": float(m[0, 1:].sum() / m[0].sum()) if m[0].sum() > 0 else float("nan")}


LOST_BELOW = 0.2    # an object is lost when under this share of its pixels gets its class


def region_recalls(pred: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> dict:
    """{class id: share of its ground-truth pixels that ``pred`` gives that class}, for each
    object class in ``target`` (an image's region of one class stands for its object)."""
    out = {}
    for c in target.unique().tolist():
        if c in (0, ignore_index):
            continue
        inside = target == c
        out[int(c)] = float((pred[inside] == c).sum()) / float(inside.sum())
    return out


def lost_objects(recalls: dict, reference: dict | None = None) -> dict:
    """Of the objects in ``recalls`` ({(image, class): recall}), the share lost (recall under
    ``LOST_BELOW``); with ``reference`` (the same objects under an earlier stage), also the share
    of the objects that stage found which this one lost (``dropped``)."""
    n = len(recalls)
    res = {"objects": n, "lost": sum(r < LOST_BELOW for r in recalls.values()) / max(n, 1)}
    if reference is not None:
        found = [k for k, r in reference.items() if r >= LOST_BELOW and k in recalls]
        res["dropped"] = sum(recalls[k] < LOST_BELOW for k in found) / max(len(found), 1)
    return res