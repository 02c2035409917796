"""IRN's inter-pixel relations (Ahn, Cho & Kwak, CVPR 2019), the semantic path: confident regions
of the CAMs as relation labels, the affinity of two pixels from a class-boundary map (one minus
the largest boundary value on the band of pixels between them), and the random walk on those
affinities. Pure tensor code; facts from the authors' code (jiwoon-ahn/irn), written anew.

The pixel pairs are AffinityNet's: the half-plane offsets of ``affinity.neighbor_offsets`` (34
within radius 5, 152 within radius 10), so IRN's loss is ``affinity.relation_loss`` on the same
pair masks, and its walk is ``random_walk.apply_transition`` on weights in the same layout.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .affinity import NEUTRAL, neighbor_offsets
from .random_walk import apply_transition, weights_from_pairs

FG_THRES, BG_THRES = 0.30, 0.05       # the authors' confident fore- and background (run_sample.py)


@lru_cache(maxsize=None)
def path_offsets(dy: int, dx: int) -> tuple[tuple[int, int], ...]:
    """The pixels between (0, 0) and (dy, dx) whose affinity the boundary on them decides: every
    integer (y, x) of the pair's bounding box closer than 1 to the line through both ends (a band,
    not one line of pixels), both ends included. (1, 1) gives all four pixels of its box."""
    n = dy * dy + dx * dx
    return tuple((y, x) for y in range(min(0, dy), max(0, dy) + 1)
                 for x in range(min(0, dx), max(0, dx) + 1)
                 if (dy * x - dx * y) ** 2 < n)


def boundary_affinity(boundary: torch.Tensor, radius: int) -> torch.Tensor:
    """``1 - max(boundary on the band between them)`` of every pair (p, p + offset), (B, K, H, W)
    for the K half-plane offsets of ``neighbor_offsets(radius)``; boundary (B, H, W) in [0, 1].
    A pair whose partner lies outside the image reads boundary 1 there: affinity 0 (such pairs
    are in no loss term and no walk)."""
    b, h, w = boundary.shape
    p = radius - 1
    padded = F.pad(boundary, (p, p, 0, p), value=1.0)     # the half-plane never looks up
    out = []
    for dy, dx in neighbor_offsets(radius):
        views = [padded[:, y:y + h, p + x:p + x + w] for y, x in path_offsets(dy, dx)]
        out.append(torch.stack(views).amax(0))
    return 1 - torch.stack(out, dim=1)


def boundary_transition_weights(boundary: torch.Tensor, beta: float = 10.0,
                                radius: int = 5) -> torch.Tensor:
    """IRN's transition matrix ``D^-1 A^beta`` (A: :func:`boundary_affinity`, 1 on the diagonal)
    as row-normalised weight maps in the layout of ``random_walk.transition_weights``."""
    h, w = boundary.shape[-2:]
    aff = boundary_affinity(boundary, radius).clamp_(min=0).pow_(beta)
    return weights_from_pairs(aff, radius, h, w)


def boundary_walk(cams: torch.Tensor, boundary: torch.Tensor, beta: float = 10.0, t: int = 256,
                  radius: int = 5, tol: float = 0.0) -> torch.Tensor:
    """IRN's propagation of the CAMs: ``T^t vec((1 - boundary) · cam_c)`` for every channel, with
    T from :func:`boundary_transition_weights` (the authors square their dense T ``exp_times``
    times: t = 2^exp_times). cams (B, C, H, W) and boundary (B, H, W) on the same grid (stride 4).
    ``tol``: as ``random_walk.apply_transition``."""
    weights = boundary_transition_weights(boundary.to(cams.dtype), beta, radius)
    return apply_transition(weights, cams * (1 - boundary[:, None].to(cams.dtype)), radius,
                            steps=t, tol=tol)


def walk_to_label(walked: torch.Tensor, class_ids: Sequence[int], bg_score: float = 0.25,
                  refine: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """The authors' labels from walked maps (C, H, W) of the image's classes at image size: the
    maps divided by their one global maximum, a constant background score prepended, the argmax
    as class ids (0: background). ``refine`` (not the authors'): the dense CRF on those scores
    normalised to sum to one over the labels (C + 1, H, W), before the argmax."""
    ids = torch.tensor([0, *class_ids], dtype=torch.long, device=walked.device)
    scores = walked / walked.max().clamp(min=1e-5)
    scores = torch.cat([scores.new_full((1, *scores.shape[1:]), bg_score), scores])
    if refine is not None:
        scores = refine((scores / scores.sum(0, keepdim=True).clamp(min=1e-5)).clamp(min=1e-5))
    return ids[scores.argmax(0)]


def confident_labels(cams: torch.Tensor, class_ids: Sequence[int], fg_thres: float = FG_THRES,
                     bg_thres: float = BG_THRES,
                     refine: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None
                     ) -> torch.Tensor:
    """IRN's relation labels from the CAMs (C, H, W) of an image's classes ``class_ids`` at image
    resolution: a class where the CAMs beat ``fg_thres`` (the argmax over a constant channel of
    ``fg_thres`` and the CAMs), background where even ``bg_thres`` beats them, 255 (no relation
    taken) between. ``refine(label_map, n_labels)``: the dense CRF on each hard label map (the
    authors' ``crf_inference_label``, ``crf.crf_labels``); None keeps the argmax."""
    ids = torch.tensor([0, *class_ids], dtype=torch.long, device=cams.device)

    def argmax_with(thres: float) -> torch.Tensor:
        lab = torch.cat([cams.new_full((1, *cams.shape[1:]), thres), cams]).argmax(0)
        return ids[refine(lab, len(ids)) if refine is not None else lab]

    fg, bg = argmax_with(fg_thres), argmax_with(bg_thres)
    out = torch.where(fg == 0, torch.full_like(fg, NEUTRAL), fg)
    return torch.where((fg == 0) & (bg == 0), torch.zeros_like(fg), out)


def reduce_labels(labels: torch.Tensor, stride: int = 4) -> torch.Tensor:
    """Labels (..., H, W) at image resolution sampled to the feature grid of ``stride`` by nearest
    neighbour, at the centres PIL's nearest resize picks (the authors' ``pil_rescale(label, 0.25,
    order=0)``): rows and columns ``stride // 2``, ``stride // 2 + stride``, ..."""
    c = stride // 2
    return labels[..., c::stride, c::stride]


def boundary_walk_dense_authors(cams: torch.Tensor, boundary: torch.Tensor, beta: float = 10.0,
                                t: int = 256, radius: int = 5) -> torch.Tensor:
    """The authors' dense method exactly (``indexing.propagate_to_edge``), the baseline of
    ``bench random-walk --method irn``: the boundary padded with 1 (``radius`` left, right and
    below), the pairs of their source window scattered both ways into a dense (hw)^2 matrix with
    1 on the diagonal, raised to ``beta``, normalised, squared log2(t) times, applied to
    ``(1 - boundary) x cams``. cams (C, H, W), boundary (H, W). O((hw)^2) memory."""
    c, h, w = cams.shape
    big_h, big_w = h + radius, w + 2 * radius
    pad = F.pad(boundary[None, None], (radius, radius, 0, radius), value=1.0)[0, 0].reshape(-1)
    full = torch.arange(big_h * big_w, device=cams.device).reshape(big_h, big_w)
    rf = radius - 1
    ch, cw = big_h - rf, big_w - 2 * rf
    src = full[:ch, rf:rf + cw].reshape(-1)
    n = big_h * big_w
    a = torch.eye(n, dtype=cams.dtype, device=cams.device)
    for dy, dx in neighbor_offsets(radius):
        band = torch.stack([full[y:y + ch, rf + x:rf + x + cw].reshape(-1)
                            for y, x in path_offsets(dy, dx)])
        aff = 1 - pad[band].amax(0)
        dst = full[dy:dy + ch, rf + dx:rf + dx + cw].reshape(-1)
        a[src, dst] = aff
        a[dst, src] = aff
    a = a.reshape(big_h, big_w, big_h, big_w)[:-radius, radius:-radius, :-radius, radius:-radius]
    a = a.reshape(h * w, h * w).pow_(beta)
    tm = a / a.sum(dim=0, keepdim=True)
    for _ in range(max(t.bit_length() - 1, 0)):
        tm = tm @ tm
    return ((cams * (1 - boundary)).reshape(c, -1) @ tm).reshape(c, h, w)
