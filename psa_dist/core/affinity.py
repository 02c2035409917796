"""Affinity labels from CAMs and the AffinityNet loss (the paper, stages 2 and 3). Pure tensor code."""
from __future__ import annotations

from functools import lru_cache
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import native

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


# Elements (images x channels x buffer length) of the flat feature buffer that _PairDistance works
# on at a time on a CPU. Going through all offsets on one such block (16 MB) keeps the work in
# large-enough pieces: on the demo's (8, 480, 32, 32) features the loss's forward + backward took
# 0.93 s with plain autograd, 0.15 s with 4 MB blocks and 0.29 s with these, but with another
# process busy on one of two cores 5.5 / 15.7 / 4.3 s: every parallel op then pays a wait, and
# smaller blocks mean more ops. A whole AffinityNet step (idle): 1.64 / 0.77 / 0.83 s.
# A GPU takes the whole batch at once: there, fewer and larger kernels are what counts.
CPU_BLOCK = 1 << 22


def _flat_layout(h: int, w: int, offsets) -> tuple[int, int, list[int]]:
    """(row, length, shifts) of the flat layout of an (H, W) grid for half-plane ``offsets``.

    Each row is followed by ``max |dx|`` pad columns and the grid by ``max dy`` pad rows, all in one
    flat buffer of ``length``; partner (y + dy, x + dx) of flat position q = y * row + x is then
    q + shift with shift = dy * row + dx, and it reads the pad exactly when it lies outside the
    image (a negative dx that leaves the image lands in the previous row's pad columns). So the
    term of an offset is one operation on two contiguous ranges, without shifted copies.
    """
    if any(dy < 0 or (dy == 0 and dx <= 0) for dy, dx in offsets):
        raise ValueError(f"offsets must lie in the half-plane dy > 0 or (dy == 0, dx > 0): {offsets}")
    cols = max(abs(dx) for _, dx in offsets)
    row = w + cols
    return row, (h + max(dy for dy, _ in offsets)) * row + cols, [dy * row + dx for dy, dx in offsets]


def _to_flat(x: torch.Tensor, row: int, length: int, fill=0) -> torch.Tensor:
    """(..., H, W) -> (..., length): the grid row after row, ``row - W`` pad columns after each row,
    then pad up to ``length``; the pad holds ``fill``."""
    h, w = x.shape[-2:]
    buf = x.new_full(x.shape[:-2] + (length,), fill)
    buf[..., :h * row].view(x.shape[:-2] + (h, row))[..., :w] = x
    return buf


def _inside(offsets, h: int, w: int, device) -> torch.Tensor:
    """(K, H, W) bool: whether the partner (y + dy, x + dx) of each pixel lies in the image."""
    out = torch.zeros((len(offsets), h, w), dtype=torch.bool, device=device)
    for k, (dy, dx) in enumerate(offsets):
        (r1, c1), _ = pair_slices(dy, dx, h, w)
        out[k, r1, c1] = True
    return out


def _blocks(b: int, d: int, length: int, block: Optional[int]):
    """(images, channels) slices covering a (B, D, length) buffer in blocks of at most ``block``
    elements: as many whole images as fit, else equal channel chunks of one image (never less than
    one channel). None: the whole buffer in one block."""
    if block is None or b * d * length <= block:
        yield slice(0, b), slice(0, d)
        return
    if d * length <= block:
        n = block // (d * length)
        for i in range(0, b, n):
            yield slice(i, min(i + n, b)), slice(0, d)
        return
    size = -(-d // -(-(d * length) // block))
    for i in range(b):
        for c in range(0, d, size):
            yield slice(i, i + 1), slice(c, min(c + size, d))


class _PairDistance(torch.autograd.Function):
    """``mean_d |f_i - f_j|`` for every in-image pair at every offset, saving only the features.

    Autograd through ``(f_i - f_j).abs().mean()`` keeps one (B, D, h, w) difference per offset for
    abs's backward (about 0.5 GB per batch of the demo); here the backward recomputes the
    differences, block by block, and uses only their signs.
    """

    @staticmethod
    def forward(ctx, features, offsets, block):
        b, d, h, w = features.shape
        row, length, shifts = _flat_layout(h, w, offsets)
        n = h * row
        buf = _to_flat(features.detach(), row, length)
        ctx.save_for_backward(features)
        ctx.offsets, ctx.block = offsets, block
        if native.serves(buf):
            dist = native.pair_mean_l1(buf, 0, n, shifts).view(b, len(offsets), h, row)[..., :w]
            return torch.where(_inside(offsets, h, w, features.device), dist, 0).contiguous()
        sums = features.new_zeros((len(offsets), b, n))      # (K, B, n): each [k, images] contiguous
        for imgs, chans in _blocks(b, d, length, block):
            part = buf[imgs, chans]
            base = part[..., :n]
            diff = torch.empty_like(base)
            for k, s in enumerate(shifts):
                torch.sub(base, part[..., s:s + n], out=diff)
                sums[k, imgs] += diff.abs_().sum(dim=1)
        dist = sums.view(len(offsets), b, h, row)[..., :w].transpose(0, 1) / d
        return torch.where(_inside(offsets, h, w, features.device), dist, 0).contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        features, = ctx.saved_tensors
        offsets = ctx.offsets
        b, d, h, w = features.shape
        row, length, shifts = _flat_layout(h, w, offsets)
        n = h * row
        # d dist / d f_i = sign(f_i - f_j) / D = -d dist / d f_j; an outside entry is a constant 0.
        grad = torch.where(_inside(offsets, h, w, grad.device), grad, 0)
        buf = _to_flat(features, row, length)
        if native.serves(buf):
            grad_buf = native.pair_mean_l1_backward(buf, 0, n, shifts, _to_flat(grad, row, n))
            return grad_buf[..., :n].view(b, d, h, row)[..., :w].contiguous(), None, None
        scale = _to_flat(grad.transpose(0, 1) / d, row, n).unsqueeze(2)    # (K, B, 1, n)
        grad_buf = torch.zeros_like(buf)
        for imgs, chans in _blocks(b, d, length, ctx.block):
            part, grad_part = buf[imgs, chans], grad_buf[imgs, chans]
            base = part[..., :n]
            sign = torch.empty_like(base)
            for k, s in enumerate(shifts):
                # sign(0) = 0, as autograd's abs backward: equal features pass no gradient
                torch.sub(base, part[..., s:s + n], out=sign).sign_()
                grad_part[..., :n].addcmul_(sign, scale[k, imgs])
                grad_part[..., s:s + n].addcmul_(sign, scale[k, imgs], value=-1)
        return grad_buf[..., :n].view(b, d, h, row)[..., :w].contiguous(), None, None


def pair_distances(features: torch.Tensor, offsets: Sequence[tuple[int, int]],
                   block: Optional[int] = -1) -> torch.Tensor:
    """``mean_d |f(y, x) - f(y + dy, x + dx)|`` as (B, K, H, W) for the K half-plane ``offsets``;
    0 where the partner lies outside the image. features (B, D, H, W).

    The distances of :func:`pair_affinity` (``pair_affinity(f, dy, dx) == exp(-out[:, k, r1, c1])``
    with ``(r1, c1)`` the first slices of :func:`pair_slices`), with a backward that stores no
    differences. On a CPU in float32 both directions run in the C kernels of
    :mod:`psa_dist.native` (3x faster than the torch ops for the loss's forward + backward on the
    demo's features). Otherwise torch ops, where ``block`` bounds the elements processed at a time
    (-1: :data:`CPU_BLOCK` on a CPU, the whole batch on a GPU; None: the whole batch).
    """
    if features.dim() != 4:
        raise ValueError(f"features must be (B, D, H, W), got shape {tuple(features.shape)}")
    if block == -1:
        block = None if features.device.type == "cuda" else CPU_BLOCK
    return _PairDistance.apply(features, tuple(tuple(o) for o in offsets), block)


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


def cell_grid(height: int, width: int, stride: int) -> tuple[int, int]:
    """The cells of an image on a feature grid of ``stride`` (a partial last cell counts): the
    shape of its affinity labels, and of AffinityNet's features of it padded to a multiple."""
    return -(-height // stride), -(-width // stride)


def cells_to_pixels(labels: torch.Tensor, height: int, width: int, stride: int) -> torch.Tensor:
    """Labels on the cell grid (..., h, w) back at the image's resolution: each cell's label on
    its ``stride`` x ``stride`` pixels, the partial last cells cut at the image's edge."""
    if tuple(labels.shape[-2:]) != cell_grid(height, width, stride):
        raise ValueError(f"labels of shape {tuple(labels.shape[-2:])} are not the stride-{stride} "
                         f"cell grid {cell_grid(height, width, stride)} of a {height}x{width} image")
    up = labels.repeat_interleave(stride, dim=-2).repeat_interleave(stride, dim=-1)
    return up[..., :height, :width]


def pair_label_masks(labels: torch.Tensor, radius: int = 5, border: str = "all") -> dict:
    """The pairs' labels of every in-image pair within ``radius``: ``{"bg", "fg", "neg"}`` masks
    (B, K, H, W) over the half-plane offsets of :func:`neighbor_offsets` (entry (b, k, y, x): the
    pair of (y, x) and (y, x) + offset k). Positive pairs share a non-neutral label (bg if it is
    0, else fg); negative pairs have two different non-neutral labels; a pair touching a neutral
    (255) cell, or whose partner lies outside the image, is in none.

    ``border``: ``all`` takes every pair with both ends in the crop; ``authors`` the pair window
    of the authors' code (AffinityNet's and IRN's alike), which takes only pairs starting at least
    ``radius - 1`` cells from the bottom, left and right edges (its label extraction slices a fixed
    window of start cells), so a crop's border cells start no pair (86% of a 56x56 crop's pairs are
    kept at radius 5)."""
    h, w = labels.shape[-2:]
    offsets = neighbor_offsets(radius)
    # The partner's label of every entry, through the flat layout: a partner outside the image
    # reads the NEUTRAL pad, so such entries belong to no term.
    row, length, shifts = _flat_layout(h, w, offsets)
    flat = _to_flat(labels, row, length, NEUTRAL)
    lj = torch.stack([flat[:, s:s + h * row] for s in shifts], dim=1)
    lj = lj.view(labels.shape[0], len(offsets), h, row)[..., :w]
    li = labels[:, None]
    if border == "authors":
        start = torch.zeros(h, w, dtype=torch.bool, device=labels.device)
        start[:max(0, h - radius + 1), radius - 1:max(radius - 1, w - radius + 1)] = True
        li = torch.where(start, li, torch.full_like(li, NEUTRAL))
    elif border != "all":
        raise ValueError(f"border must be 'all' or 'authors', got {border!r}")
    valid = (li != NEUTRAL) & (lj != NEUTRAL)
    same = valid & (li == lj)
    return {"bg": same & (li == 0), "fg": same & (li != 0), "neg": valid & (li != lj)}


def relation_loss(aff: torch.Tensor, masks: dict, return_terms: bool = False):
    """``L_bg+/4 + L_fg+/4 + L-/2`` (AffinityNet's loss, and IRN's on its boundary affinities):
    each term the mean over its pairs in the whole batch of ``-log(A + 1e-5)`` (positives) or
    ``-log(1 + 1e-5 - A)`` (negatives), a term without pairs 0. ``aff`` (B, K, H, W) in [0, 1] and
    ``masks`` from :func:`pair_label_masks`."""
    # Both -log maps on every entry, kept by where (an entry left out gets no gradient): both are
    # finite everywhere since 0 <= A <= 1, so a left-out entry cannot turn into a NaN.
    pos, neg = -torch.log(aff + EPS), -torch.log(1 + EPS - aff)
    zero = aff.new_zeros(())
    sums = {k: torch.where(m, neg if k == "neg" else pos, zero).sum() for k, m in masks.items()}
    counts = {k: int(m.sum()) for k, m in masks.items()}
    terms = {k: sums[k] / counts[k] if counts[k] else zero for k in sums}
    loss = terms["bg"] / 4 + terms["fg"] / 4 + terms["neg"] / 2
    if return_terms:
        return loss, {**{k: float(v.detach()) for k, v in terms.items()},
                      **{f"n_{k}": c for k, c in counts.items()}}
    return loss


def affinity_loss(features: torch.Tensor, labels: torch.Tensor, radius: int = 5,
                  return_terms: bool = False, border: str = "all"):
    """AffinityNet's loss (the paper, stage 3): :func:`relation_loss` of the affinities
    ``exp(-mean_d |f_i - f_j|)`` of every in-image pair within ``radius`` under the pairs' labels
    (:func:`pair_label_masks`, with its ``border``).

    features (B, D, H, W), labels (B, H, W) as made by :func:`affinity_labels` at the same
    resolution. All offsets at once: the distances come from :func:`pair_distances` (whose
    backward keeps no per-offset differences), the terms from (B, K, H, W) maps of the pairs'
    labels.
    """
    if features.dim() != 4 or labels.dim() != 3 or features.shape[-2:] != labels.shape[-2:] \
            or features.shape[0] != labels.shape[0]:
        raise ValueError(f"features (B, D, H, W) and labels (B, H, W) must match, got "
                         f"{tuple(features.shape)} and {tuple(labels.shape)}")
    aff = torch.exp(-pair_distances(features, neighbor_offsets(radius)))
    return relation_loss(aff, pair_label_masks(labels, radius, border), return_terms)
