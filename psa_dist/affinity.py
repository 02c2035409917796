"""Affinity labels from CAMs and the AffinityNet loss (PAPER.md, stages 2 and 3). Pure tensor code."""
from __future__ import annotations

from functools import lru_cache
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

NEUTRAL = 255
EPS = 1e-5


@lru_cache(maxsize=None)
def _offsets(radius: int) -> tuple:
    out = [(0, dx) for dx in range(1, radius)]
    for dy in range(1, radius):
        for dx in range(-radius + 1, radius):
            if dy * dy + dx * dx < radius * radius:
                out.append((dy, dx))
    return tuple(out)


def neighbor_offsets(radius: int = 5) -> list[tuple[int, int]]:
    """The paper's half-plane of neighbour offsets (dy, dx) within ``radius`` (34 for radius 5).

    Every unordered pair of distinct pixels closer than ``radius`` is (i, i + offset) for exactly one
    pixel i and one offset here.
    """
    if radius < 2:
        raise ValueError(f"radius must be >= 2, got {radius}")
    return list(_offsets(radius))


def pair_slices(dy: int, dx: int, h: int, w: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """(rows, cols) slices of the first and second pixel of every in-image pair (i, i + (dy, dx))."""
    first = (slice(0, h - dy), slice(max(0, -dx), w - max(0, dx)))
    second = (slice(dy, h), slice(max(0, dx), w + min(0, dx)))
    return first, second


def pair_affinity(features: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``exp(-mean_d |f_i - f_j|)`` for every in-image pair at offset (dy, dx); features (..., D, H, W).

    The paper writes the L1 norm; the authors' code (and this) use the mean over channels (L1 / D),
    which only rescales the feature space.
    """
    h, w = features.shape[-2:]
    (r1, c1), (r2, c2) = pair_slices(dy, dx, h, w)
    diff = (features[..., r1, c1] - features[..., r2, c2]).abs().mean(dim=-3)
    return torch.exp(-diff)


def background_score(cams: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - max_c cam)^alpha`` over the class dimension (-3); cams (..., C, H, W) in [0, 1]."""
    if cams.shape[-3] == 0:
        return torch.ones(cams.shape[:-3] + (1,) + cams.shape[-2:], dtype=cams.dtype,
                          device=cams.device)
    return (1 - cams.amax(dim=-3, keepdim=True)).clamp(min=0).pow(alpha)


def affinity_labels(cams: torch.Tensor, alpha_lo: float = 4.0, alpha_hi: float = 32.0,
                    refine: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                    class_ids: Optional[Sequence[int]] = None, pool: int = 1) -> torch.Tensor:
    """Confident-region labels: 0 background, c + 1 class c (or ``class_ids[c]``), 255 neutral.

    ``cams`` (C, H, W) holds normalised CAM scores in [0, 1] (absent classes all zero). With alpha_lo
    the background score is weak, so the argmax keeps only confident foreground; with alpha_hi it is
    strong, so the argmax is background only where the background is confident. Rule, as in the
    authors' code: start neutral, write the alpha_lo foreground, then write background wherever the
    alpha_hi argmax is background (it wins a conflict, which only the CRF can create).

    ``refine`` maps a (C+1, H, W) score map (background first) to refined scores, e.g. the dense CRF
    (``functools.partial(crf_refine, image)``), applied to both maps before the argmax. ``pool``
    average-pools the (refined) maps by that factor first: the authors take labels at stride 8.
    ``class_ids`` names the class of each channel when ``cams`` holds only some classes.
    """
    if cams.dim() != 3:
        raise ValueError(f"cams must be (C, H, W), got shape {tuple(cams.shape)}")
    ids = torch.as_tensor(list(class_ids) if class_ids is not None
                          else range(1, cams.shape[0] + 1), dtype=torch.long, device=cams.device)
    if ids.numel() != cams.shape[0]:
        raise ValueError(f"class_ids has {ids.numel()} entries for {cams.shape[0]} CAM channels")
    lut = torch.cat([torch.zeros(1, dtype=torch.long, device=cams.device), ids])

    def argmax_of(alpha: float) -> torch.Tensor:
        scores = torch.cat([background_score(cams, alpha), cams], dim=0)
        if refine is not None:
            scores = torch.as_tensor(refine(scores), dtype=cams.dtype, device=cams.device)
        if pool > 1:
            scores = F.avg_pool2d(scores[None], pool, pool, ceil_mode=True)[0]
        return scores.argmax(dim=0)

    lo, hi = argmax_of(alpha_lo), argmax_of(alpha_hi)
    labels = torch.full_like(lo, NEUTRAL)
    labels = torch.where(lo != 0, lut[lo], labels)
    labels = torch.where(hi == 0, torch.zeros_like(labels), labels)
    return labels


def affinity_loss(features: torch.Tensor, labels: torch.Tensor, radius: int = 5,
                  return_terms: bool = False):
    """``L_bg+/4 + L_fg+/4 + L-/2`` over every in-image pair within ``radius`` (PAPER.md stage 3).

    features (B, D, H, W), labels (B, H, W) as made by :func:`affinity_labels` at the same
    resolution. Positive pairs share a non-neutral label (bg+ if it is 0, else fg+); negative pairs
    have two different non-neutral labels. Each term is the mean over its pairs in the whole batch of
    ``-log(W + 1e-5)`` (positives) or ``-log(1 + 1e-5 - W)`` (negatives); a term without pairs is 0.
    Computed offset by offset so memory stays at one (B, H, W) affinity map at a time.
    """
    if features.dim() != 4 or labels.dim() != 3 or features.shape[-2:] != labels.shape[-2:] \
            or features.shape[0] != labels.shape[0]:
        raise ValueError(f"features (B, D, H, W) and labels (B, H, W) must match, got "
                         f"{tuple(features.shape)} and {tuple(labels.shape)}")
    h, w = labels.shape[-2:]
    zero = features.new_zeros(())
    sums = {"bg": zero, "fg": zero, "neg": zero}
    counts = {"bg": 0, "fg": 0, "neg": 0}
    for dy, dx in neighbor_offsets(radius):
        if dy >= h or abs(dx) >= w:
            continue
        (r1, c1), (r2, c2) = pair_slices(dy, dx, h, w)
        aff = pair_affinity(features, dy, dx)
        li, lj = labels[:, r1, c1], labels[:, r2, c2]
        valid = (li != NEUTRAL) & (lj != NEUTRAL)
        same = valid & (li == lj)
        masks = {"bg": same & (li == 0), "fg": same & (li != 0), "neg": valid & (li != lj)}
        for k, m in masks.items():
            n = int(m.sum())
            if n:
                counts[k] += n
                val = -torch.log(aff[m] + EPS) if k != "neg" else -torch.log(1 + EPS - aff[m])
                sums[k] = sums[k] + val.sum()
    terms = {k: sums[k] / counts[k] if counts[k] else zero for k in sums}
    loss = terms["bg"] / 4 + terms["fg"] / 4 + terms["neg"] / 2
    if return_terms:
        return loss, {**{k: float(v.detach()) for k, v in terms.items()}, **{f"n_{k}": c for k, c in counts.items()}}
    return loss
