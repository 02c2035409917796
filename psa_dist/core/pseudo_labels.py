"""Pseudo labels from CAMs and AffinityNet features: the tensor steps of the authors' ``infer_aff``
for a batch of images, and the walk a perfect affinity would make (a diagnostic of the CAMs).

The network's forward pass is not here: :func:`walk_labels` takes the features it produced on each
image zero-padded to a multiple of 8 (:func:`psa_dist.core.image.pad_to_multiple`), so that the
label stage, the tests and any other caller share every step after it.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .affinity import EPS
from .cam import rw_inputs, rw_to_label
from .random_walk import random_walk_many

# the dense CRF on an image's walked maps: probabilities (C, H, W) -> refined scores (C, H, W)
Refine = Callable[[torch.Tensor], torch.Tensor]


def walk_labels(features: Sequence[torch.Tensor], cams: Sequence[torch.Tensor],
                class_ids: Sequence[Sequence[int]], beta: float = 8.0, t: int = 256,
                radius: int = 5, bg_alpha: float = 16.0, tol: float = 0.0,
                refine: Optional[Sequence[Optional[Refine]]] = None) -> list[torch.Tensor]:
    """The random-walk pseudo label (H, W) of each image.

    ``features[i]``: AffinityNet's output (D, h, w) on image i zero-padded to a multiple of 8;
    ``cams[i]``: its CAMs (K, H, W) at image resolution for the classes ``class_ids[i]``
    (1-based). Per image, as the authors do: background score ``(1 - max)^bg_alpha`` at full
    resolution, zero-pad to the multiple of 8, average-pool to the feature grid (8×8 cells, or
    4×4 at stride 4), walk, upsample bilinearly, crop, argmax. Only the present classes and the
    background are propagated. The walks of all images run as one batch (``random_walk_many``:
    exact, whatever their sizes; ``tol``: see ``apply_transition``). ``refine[i]`` (or None): the
    dense CRF on image i's walked maps, normalised to sum to one over the labels, before the
    argmax.
    """
    if not len(features) == len(cams) == len(class_ids):
        raise ValueError(f"{len(features)} feature maps, {len(cams)} CAMs and {len(class_ids)} "
                         f"class lists: one of each per image")
    refine = list(refine) if refine is not None else [None] * len(cams)
    maps, sizes = [], []
    for f, cam in zip(features, cams):
        h, w = cam.shape[-2:]
        ph, pw = (-h) % 8, (-w) % 8
        m = F.pad(rw_inputs(cam.to(f.device), bg_alpha), (0, pw, 0, ph))
        cell = (h + ph) // f.shape[-2]
        m = F.avg_pool2d(m[None], cell, cell)[0]
        if m.shape[-2:] != f.shape[-2:]:
            raise ValueError(f"feature grid {tuple(f.shape[-2:])} != CAM grid "
                             f"{tuple(m.shape[-2:])}")
        maps.append(m)
        sizes.append((h, w, ph, pw))
    labels = []
    for walked, (h, w, ph, pw), ids, crf in zip(random_walk_many(maps, list(features), beta, t,
                                                                 radius, tol),
                                                sizes, class_ids, refine):
        up = F.interpolate(walked[None], size=(h + ph, w + pw), mode="bilinear",
                           align_corners=False)[0][:, :h, :w]
        if crf is not None:
            up = crf((up / up.sum(0, keepdim=True).clamp(min=EPS)).clamp(min=EPS))
        labels.append(rw_to_label(up, ids))
    return labels


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
