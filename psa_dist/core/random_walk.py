"""The random walk that revises CAMs with learned affinities (the paper, stage 4). Pure tensor code.

``T = D^-1 W^{∘beta}`` where W links every pixel to each pixel closer than ``radius`` (the 34
half-plane offsets, their mirror images, and itself with W_ii = 1). Each row of T has at most 69
non-zeros, so instead of the authors' dense N×N matrix (squared log2(t) times: O(N^3) time, O(N^2)
memory) we keep T as 69 weight maps and apply it t times by shifted multiply-adds over contiguous
memory (see ``apply_transition``): O(t·N·69·C) time and O(N·69) memory, exactly the same
operator. Pairs whose partner would leave the image are absent (no links dropped at the border,
unlike the authors' code, whose pairs start only ``radius - 1`` cells from the bottom, left and
right edges: :func:`transition_matrix_authors` builds their T exactly), and each row is normalised
over the links it has.

On a CPU in float32 the two hot loops, the pair distances of T and the truncated walk, run in the
C kernels of :mod:`psa_dist.native` (torch ops elsewhere, with the same results to float rounding).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import native
from .affinity import _inside, neighbor_offsets, pair_slices


def _full_offsets(radius: int) -> list[tuple[int, int]]:
    half = neighbor_offsets(radius)
    return [(0, 0)] + half + [(-dy, -dx) for dy, dx in half]


def _flat_padded(x: torch.Tensor, p: int) -> tuple[torch.Tensor, int, int]:
    """(B, C, H, W) -> a zero buffer (B, C, L) holding x with p zero rows and columns around it,
    row after row, plus a margin of p at each end; returns (buffer, row length, index of the first
    output element). Neighbour (dy, dx) of flat position q is at q + dy * row + dx."""
    b, c, h, w = x.shape
    row = w + 2 * p
    start = p + p * row
    buf = x.new_zeros((b, c, start + h * row + p * row + p))
    buf[:, :, start:start + h * row] = F.pad(x, (p, p)).reshape(b, c, h * row)
    return buf, row, start


def pair_distance_maps(buf: torch.Tensor, start: int, n: int, shifts) -> torch.Tensor:
    """``out[b, k, p] = mean_d |buf[b, d, start + p] - buf[b, d, start + p + shifts[k]]|``, (B, K, n):
    the distances of ``pair_affinity`` over the flat padded layout. On the CPU in float32 this is
    the C kernel of :mod:`psa_dist.native` (one pass over the features per block of pixels, about
    4x faster than the torch ops below, which make three passes over a D×n temporary per offset);
    elsewhere, or where no C compiler is found, torch ops."""
    if native.serves(buf):
        return native.pair_mean_l1(buf.contiguous(), start, n, shifts)
    base, diff = buf[:, :, start:start + n], buf.new_empty((buf.shape[0], buf.shape[1], n))
    out = buf.new_empty((buf.shape[0], len(shifts), n))
    for k, q in enumerate(shifts):
        torch.sub(base, buf[:, :, start + q:start + q + n], out=diff)
        torch.mean(diff.abs_(), dim=1, out=out[:, k])
    return out


def transition_weights(features: torch.Tensor, beta: float = 8.0, radius: int = 5) -> torch.Tensor:
    """Row-normalised transition weights, (B, K, H, W) with K = 1 + 2·34 for radius 5.

    ``out[b, k, y, x]`` is ``T[(y, x), (y, x) + full_offsets[k]]``; zero where that partner lies
    outside the image. features (B, D, H, W). The distances ``mean_d |f_i - f_j|`` (those of
    ``pair_affinity``) are taken over the flat padded layout of ``apply_transition``: contiguous
    reads, 4x faster than strided slices on 448 channels.
    """
    b, d, h, w = features.shape
    half = neighbor_offsets(radius)
    p = radius - 1
    buf, row, start = _flat_padded(features, p)
    links = _links(radius, h, w)
    dist = pair_distance_maps(buf, start, h * row, [dy * row + dx for _, dy, dx in links])
    dist = dist.reshape(b, len(links), h, row)[..., p:p + w]
    # W_ij^beta for every pair (p, p + o) at once; zero where the partner lies outside the image
    a = torch.exp(-dist).pow_(beta).mul_(_inside([(dy, dx) for _, dy, dx in links], h, w,
                                                 features.device))
    return _normalised(a, links, len(half), h, w)


def _links(radius: int, h: int, w: int) -> list[tuple[int, int, int]]:
    """(index, dy, dx) of the half-plane offsets that fit in an (H, W) grid."""
    return [(i, dy, dx) for i, (dy, dx) in enumerate(neighbor_offsets(radius))
            if dy < h and abs(dx) < w]


def _normalised(a: torch.Tensor, links: list, n_half: int, h: int, w: int) -> torch.Tensor:
    """The row-normalised (B, 1 + 2·n_half, H, W) weights from the pair weights ``a`` (B, L, H, W)
    of ``links`` (zero where the partner lies outside the image): 1 on the diagonal, each pair's
    weight both ways (W symmetric)."""
    b = a.shape[0]
    wts = a.new_zeros((b, 1 + 2 * n_half, h, w))
    wts[:, 0] = 1.0                                     # W_ii = exp(0) = 1, and 1^beta = 1
    wts[:, [1 + i for i, _, _ in links]] = a            # forward links  p -> p + o
    for j, (i, dy, dx) in enumerate(links):             # mirror links   p + o -> p (W symmetric)
        (r1, c1), (r2, c2) = pair_slices(dy, dx, h, w)
        wts[:, 1 + n_half + i, r2, c2] = a[:, j, r1, c1]
    return wts / wts.sum(dim=1, keepdim=True)


def weights_from_pairs(a: torch.Tensor, radius: int, h: int, w: int) -> torch.Tensor:
    """Row-normalised transition weights in the layout of :func:`transition_weights` from the
    weight ``a[b, k, y, x]`` (already raised to beta) of each pair ((y, x), (y, x) + offset k) of
    ``neighbor_offsets(radius)``; entries whose partner lies outside the image are ignored."""
    links = _links(radius, h, w)
    a = a[:, [i for i, _, _ in links]] * _inside([(dy, dx) for _, dy, dx in links], h, w, a.device)
    return _normalised(a, links, len(neighbor_offsets(radius)), h, w)


def chebyshev_power_coefficients(t: int) -> list[float]:
    """``c`` with ``x^t = sum_j c[j] T_j(x)`` (T_j the Chebyshev polynomials), j = 0..t.

    With x = cos(θ), x^t = ((e^iθ + e^-iθ) / 2)^t = Σ_k C(t, k) 2^-t cos((2k - t)θ): the coefficient
    of T_j is the probability that a sum Y of t random ±1 steps ends at ±j. The coefficients are
    non-negative and sum to 1, and |T_j| <= 1 on [-1, 1], so dropping the terms beyond degree d
    changes x^t by at most P(|Y| > d) anywhere on [-1, 1] (about 2·exp(-d²/2t)).
    """
    if t < 0:
        raise ValueError(f"t must be >= 0, got {t}")
    log2 = math.log(2.0)
    c = [0.0] * (t + 1)
    for k in range(t + 1):
        j = abs(2 * k - t)
        c[j] += math.exp(math.lgamma(t + 1) - math.lgamma(k + 1) - math.lgamma(t - k + 1) - t * log2)
    return c


def chebyshev_degree(t: int, tol: float, n: int, k: int) -> int:
    """The degree d <= t at which the truncated expansion of T^t is within ``tol · max|v|`` of
    ``T^t v`` on every element, for a grid of ``n`` cells with ``k`` links per cell (self included).

    Why: T = D^-1 A with A symmetric is similar to S = D^-1/2 A D^-1/2, whose eigenvalues lie in
    [-1, 1]; so p(T) v - T^t v = D^-1/2 (p(S) - S^t) D^1/2 v, whose 2-norm error is at most
    tail(d) · ||D^1/2 v||. Element i is off by at most tail(d) · sqrt(d_max / d_i) · ||v||_2, and
    1 <= d_i <= k (A_ii = 1, A_ij <= 1), ||v||_2 <= sqrt(n) · max|v|.
    """
    if tol <= 0:
        return t
    c = chebyshev_power_coefficients(t)
    bound = tol / math.sqrt(k * n)
    tail = 0.0
    for d in range(t, -1, -1):          # tail(d) = sum of c[j] for j > d, grown from the top
        if tail + c[d] > bound:
            return d
        tail += c[d]
    return 0


def _walk_buffers(weights: torch.Tensor, maps: torch.Tensor, radius: int):
    """The flat zero-padded layout shared by both walks (see :func:`apply_transition`)."""
    b, k, h, w = weights.shape
    p = radius - 1
    buf, row, start = _flat_padded(maps, p)
    n = h * row                          # the output: the image's rows at padded width
    wts = F.pad(weights.to(maps.dtype), (p, p)).reshape(b, k, n)
    offs = [start + dy * row + dx for dy, dx in _full_offsets(radius)]
    return buf, wts, offs, start, n, row


def apply_transition(weights: torch.Tensor, maps: torch.Tensor, radius: int, steps: int = 1,
                     tol: float = 0.0) -> torch.Tensor:
    """``maps <- T^steps maps``; weights (B, K, H, W) from :func:`transition_weights`, maps
    (B, C, H, W).

    ``tol == 0``: T is applied ``steps`` times (the paper's operator, literally). ``tol > 0``: the
    same ``T^steps maps`` from a truncated Chebyshev expansion of x^steps (see
    :func:`chebyshev_degree`), within ``tol · max|map|`` of the exact result on every element of
    every channel (in exact arithmetic; float rounding comes on top), in about
    ``sqrt(2 · steps · ln(sqrt(K·N) / tol))`` applications of T instead of ``steps``: 88 instead
    of 256 at tol 1e-5 on a VOC-size grid. Each image gets its own degree (from its own size), so
    its result does not depend on the batch it is walked in.

    Layout, for speed: the maps live in one flat buffer per (image, channel) holding the grid with
    ``radius - 1`` zero rows and columns around it, row after row. A neighbour at offset (dy, dx)
    is then the same buffer read ``dy * row + dx`` further on, so each of the K terms of a step is
    one multiply-add over contiguous memory (vectorised), and no shifted copy is ever made. The
    step is computed over whole padded rows; the weights are zero in the pad columns, so those stay
    zero and only in-image neighbours ever contribute (exactly the operator of the docstring above).
    """
    b, k, h, w = weights.shape
    p = radius - 1
    if tol > 0 and steps > 1:
        return _chebyshev_walk(weights, maps, radius, steps, tol)
    buf, wts, offs, start, n, row = _walk_buffers(weights, maps, radius)
    grid = buf[:, :, start:start + n]
    terms = [(buf[:, :, o:o + n], wts[:, j:j + 1]) for j, o in enumerate(offs)]
    out = torch.empty_like(grid)
    for _ in range(steps):
        torch.mul(terms[0][0], terms[0][1], out=out)
        for src, wt in terms[1:]:
            out.addcmul_(src, wt)
        grid.copy_(out)
    return grid.reshape(b, maps.shape[1], h, row)[:, :, :, p:p + w].contiguous()


def _chebyshev_walk(weights: torch.Tensor, maps: torch.Tensor, radius: int, steps: int,
                    tol: float) -> torch.Tensor:
    """``sum_j c_j T_j(T) maps`` by the three-term recurrence y_j+1 = 2 T y_j - y_j-1 (two padded
    buffers that swap roles, so each step is K multiply-adds and one negation, like a plain step)."""
    b, k, h, w = weights.shape
    p = radius - 1
    coef = chebyshev_power_coefficients(steps)
    # Each image's own grid (the part of a padded batch where it has links) sets its degree.
    cells = (weights[:, 0] > 0).flatten(1).sum(1).tolist()
    degrees = [chebyshev_degree(steps, tol, max(int(c), 1), k) for c in cells]
    prev, wts, offs, start, n, row = _walk_buffers(weights, maps, radius)
    if native.serves(prev):
        # The C walk: each image's whole walk in one thread, one pass over its maps per step
        # instead of K (see native.chebyshev_walk).
        acc = native.chebyshev_walk(prev, (wts * 2).contiguous(), coef, degrees, start, n,
                                    [o - start for o in offs])
        return acc.reshape(b, maps.shape[1], h, row)[:, :, :, p:p + w].contiguous()
    cur = torch.zeros_like(prev)
    wts2 = [wts[:, j:j + 1] * 2 for j in range(len(offs))]   # 2T: exact in binary floating point
    # Every view made once (slicing costs microseconds, and a step is 2 x 69 of them): for each
    # buffer, its neighbour views and its grid; the two buffers' pairs swap roles each step.
    prev, cur = [([buf[:, :, o:o + n] for o in offs], buf[:, :, start:start + n])
                 for buf in (prev, cur)]

    def double_step(src, dst) -> torch.Tensor:
        """dst's grid = 2 T (src's grid) - dst's grid."""
        dst[1].neg_()
        for view, wt in zip(src[0], wts2):
            dst[1].addcmul_(view, wt)
        return dst[1]

    acc = prev[1] * prev[1].new_tensor([coef[0]] * b).view(b, 1, 1)
    coefs = {j: acc.new_tensor([coef[j] if j <= d else 0.0 for d in degrees]).view(b, 1, 1)
             for j in range(1, max(degrees) + 1) if coef[j]}  # odd degrees of an even power are 0
    grid = double_step(prev, cur)                         # y_1 = T y_0 = (2T y_0 - 0) / 2
    grid.mul_(0.5)
    if 1 in coefs:
        acc.addcmul_(grid, coefs[1])
    for j in range(2, max(degrees) + 1):
        grid = double_step(cur, prev)                     # y_j = 2 T y_j-1 - y_j-2, in place
        if j in coefs:
            acc.addcmul_(grid, coefs[j])
        prev, cur = cur, prev
    return acc.reshape(b, maps.shape[1], h, row)[:, :, :, p:p + w].contiguous()


def random_walk(cams: torch.Tensor, features: torch.Tensor, beta: float = 8.0, t: int = 256,
                radius: int = 5, tol: float = 0.0) -> torch.Tensor:
    """``T^t vec(cam_c)`` for every channel c; cams (C, H, W) or (B, C, H, W), features (D, H, W) or
    (B, D, H, W) at the same resolution. Never builds the N×N matrix (see the module docstring).
    ``tol > 0``: within ``tol · max|cam_c|`` of it, in far fewer steps (:func:`apply_transition`)."""
    batched = cams.dim() == 4
    if not batched:
        cams, features = cams[None], features[None]
    if cams.shape[0] != features.shape[0] or cams.shape[-2:] != features.shape[-2:]:
        raise ValueError(f"cams {tuple(cams.shape)} and features {tuple(features.shape)} must share "
                         f"batch and spatial size")
    weights = transition_weights(features.to(cams.dtype), beta, radius)
    out = apply_transition(weights, cams, radius, steps=t, tol=tol)
    return out if batched else out[0]


def random_walk_many(cams: list, features: list, beta: float = 8.0, t: int = 256,
                     radius: int = 5, tol: float = 0.0) -> list:
    """:func:`random_walk` of several images of different sizes and channel counts in one batch.

    Each image's transition weights are computed on its own grid, then zero-padded to the batch's
    largest grid; maps are zero-padded in size and channels. The result is exact: a padded cell has
    no links (its row of T is zero, so it stays 0), and no real cell links to it (its weights toward
    cells outside its own image are already 0). Batching turns the walk's 69 small shifted
    multiply-adds per step into a few large ones (fewer kernel calls per image; on a GPU, one
    launch serves the batch)."""
    if len(cams) != len(features):
        raise ValueError(f"{len(cams)} CAM maps for {len(features)} feature maps")
    if not cams:
        return []
    h = max(c.shape[-2] for c in cams)
    w = max(c.shape[-1] for c in cams)
    ch = max(c.shape[0] for c in cams)
    wts, maps = [], []
    for c, f in zip(cams, features):
        if c.shape[-2:] != f.shape[-2:]:
            raise ValueError(f"cams {tuple(c.shape)} and features {tuple(f.shape)} must share "
                             f"spatial size")
        pad = (0, w - c.shape[-1], 0, h - c.shape[-2])
        wts.append(F.pad(transition_weights(f[None].to(c.dtype), beta, radius), pad))
        maps.append(F.pad(c[None], pad + (0, ch - c.shape[0])))
    out = apply_transition(torch.cat(wts), torch.cat(maps), radius, steps=t, tol=tol)
    return [o[:c.shape[0], :c.shape[-2], :c.shape[-1]] for o, c in zip(out, cams)]


def transition_matrix_dense(features: torch.Tensor, beta: float = 8.0, radius: int = 5) -> torch.Tensor:
    """The dense N×N ``T`` of one image (features (D, H, W)), row-major pixels, built as the
    authors' code does: affinities of the neighbour pairs only, scattered into a dense matrix. For
    tests and the benchmark against the authors' method only: O(N^2) memory."""
    return dense_from_weights(transition_weights(features[None], beta, radius)[0], radius)


def dense_from_weights(weights: torch.Tensor, radius: int) -> torch.Tensor:
    """The (K, H, W) weight maps of :func:`transition_weights` as the dense N×N matrix."""
    _, h, w = weights.shape
    n = h * w
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    tm = weights.new_zeros((n, n))
    for k, (dy, dx) in enumerate(_full_offsets(radius)):
        y2, x2 = ys + dy, xs + dx
        ok = (y2 >= 0) & (y2 < h) & (x2 >= 0) & (x2 < w)
        tm[(ys * w + xs)[ok], (y2 * w + x2)[ok]] = weights[k][ok]
    return tm


def transition_matrix_authors(features: torch.Tensor, beta: float = 8.0,
                              radius: int = 5) -> torch.Tensor:
    """The authors' dense ``T`` exactly (jiwoon-ahn/psa ``infer_aff``): their pairs start only at
    cells at least ``radius - 1`` from the bottom, left and right edges (the window of their
    index lists), so a cell near those edges links only to the pairs that end on it. ``W`` has
    those pairs both ways and 1 on the diagonal, is raised to ``beta`` and normalised; rows here
    (theirs normalise columns and multiply from the left: the same walk). Tests and the benchmark's
    baseline only: O(N^2) memory."""
    d, h, w = features.shape
    f = features.reshape(d, -1)
    idx = torch.arange(h * w, device=features.device).reshape(h, w)
    p = radius - 1
    start = idx[:max(0, h - p), p:max(p, w - p)]
    a = torch.eye(h * w, dtype=features.dtype, device=features.device)
    for dy, dx in neighbor_offsets(radius):
        fr = start.reshape(-1)
        to = idx[dy:dy + start.shape[0], p + dx:p + dx + start.shape[1]].reshape(-1)
        wij = torch.exp(-(f[:, fr] - f[:, to]).abs().mean(0)).pow(beta)
        a[fr, to] = wij
        a[to, fr] = wij
    return a / a.sum(dim=1, keepdim=True)


def random_walk_dense(cams: torch.Tensor, features: torch.Tensor, beta: float = 8.0, t: int = 256,
                      radius: int = 5, border: str = "all") -> torch.Tensor:
    """The dense method: T raised to the power t (by repeated squaring), times the maps. ``border``:
    ``all``, this project's T (every neighbour pair inside the image: what the sparse walk
    computes); ``authors``, the authors' T exactly (:func:`transition_matrix_authors`)."""
    c, h, w = cams.shape
    if border == "authors":
        tm = transition_matrix_authors(features.to(cams.dtype), beta, radius)
    elif border == "all":
        tm = transition_matrix_dense(features.to(cams.dtype), beta, radius)
    else:
        raise ValueError(f"border must be 'all' or 'authors', got {border!r}")
    return (torch.linalg.matrix_power(tm, t) @ cams.reshape(c, -1).T).T.reshape(c, h, w)
