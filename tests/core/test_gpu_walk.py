"""The random walk on CUDA against the CPU: ``random_walk_many`` (a padded batch of a VOC-size
grid with 21 maps and a smaller one, t 256, T applied t times and truncated) in float32 on CUDA
and on the CPU against the float64 walk on the CPU, and ``walk_labels`` (pad, pool, walk,
upsample, argmax) on CUDA against the CPU's labels. The tests are marked ``gpu`` and skip only
where CUDA is absent (``gpu_common``: the tolerances' roundoffs); the helpers also run with the
CPU standing in for CUDA, unmarked, so that their code runs in every test run.
"""
import json
import math

import pytest
import torch

from psa_dist.bench.random_walk import synthetic_inputs
from psa_dist.core.pseudo_labels import walk_labels
from psa_dist.core.random_walk import (
    apply_transition,
    chebyshev_degree,
    random_walk_many,
    transition_weights,
)
from tests.gpu_common import CUDA, U32, needs_cuda

BETA, T, RADIUS = 8.0, 256, 5
K = 1 + 2 * 34             # links per cell at radius 5, self included


def _walk_inputs():
    """A VOC image's feature grid at stride 8 (47 x 63, 448 channels, 21 maps) and a smaller one
    with 4 maps: ``random_walk_many`` walks them as one zero-padded batch."""
    sizes = [(47, 63, 21), (40, 56, 4)]
    pairs = [synthetic_inputs(h, w, c, seed=i) for i, (h, w, c) in enumerate(sizes)]
    return [f for f, _ in pairs], [c for _, c in pairs]


def _row_norm_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||T_a - T_b||_inf``: the largest row sum of |difference| of two weight maps (K on dim 1)."""
    return float((a.double().cpu() - b.double().cpu()).abs().sum(1).max())


def walk_against_float64(devices=(CUDA, "cpu")) -> dict:
    """The float32 walk on each of ``devices`` against the float64 walk on the CPU, with bounds:

    * weights: each entry of T is ``w_j / sum w`` with ``w_j = exp(-d_j)^beta`` and d a mean of D
      absolute differences (summed with error <= (D+1)u·d); ``w_j``'s absolute error is then at most
      ``beta·(D+1)u·d·e^(-beta·d) <= (D+1)u/e``, and the row sum (>= 1, since W_ii = 1) carries K-1
      of them, so ``||dT||_inf <= 2(K-1)(D+1)u/e + 2(K+2)u``.
    * walk: both are stochastic matrices (``||T||_inf = 1``), so ``T_a^t v - T_b^t v`` telescopes
      to at most ``t·||T_a - T_b||_inf·||v||_inf`` (the measured weight difference), plus each
      step's rounding, a sum of K non-negative terms: under the usual model of independent
      roundings it grows as ``sqrt(t·K)·u·||v||`` (worst case ``t·K·u``); 16 is the safety factor.
    * truncated (Chebyshev) walk, same degree on both sides (it depends only on the grid): the
      three-term recurrence's rounding grows at most quadratically in the degree d
      (``|U_m| <= m + 1``), ``d^1.5`` under the same model: ``16·d^1.5·sqrt(K)·u·||v||`` on top.

    Returns, per device, the measured errors with their bounds and the walks themselves.
    """
    feats, cams = _walk_inputs()
    d_feat = feats[0].shape[0]
    bound_t = 2 * (K - 1) * (d_feat + 1) * U32 / math.e + 2 * (K + 2) * U32
    w64 = [transition_weights(f[None].double(), BETA, RADIUS) for f in feats]
    # the float64 references: T applied t times (tol 0), or the same truncated expansion
    refs = {tol: [apply_transition(w, c[None].double(), RADIUS, T, tol)[0]
                  for w, c in zip(w64, cams)] for tol in (0.0, 1e-5)}
    out = {}
    for device in devices:
        res = {"weights": [], "exact": [], "truncated": [], "walks": {}}
        dts = []
        for f, w in zip(feats, w64):
            w_dev = transition_weights(f[None].to(device), BETA, RADIUS)
            assert w_dev.device.type == torch.device(device).type and w_dev.dtype == torch.float32
            dts.append(_row_norm_diff(w_dev, w))
            res["weights"].append({"dT": dts[-1], "bound": bound_t})
            assert dts[-1] <= bound_t, (device, res)
        for tol, key in ((0.0, "exact"), (1e-5, "truncated")):
            got = random_walk_many([c.to(device) for c in cams], [f.to(device) for f in feats],
                                   BETA, T, RADIUS, tol)
            res["walks"][key] = [g.cpu() for g in got]
            for c, g, ref, dt in zip(cams, got, refs[tol], dts):
                assert g.device.type == torch.device(device).type and g.dtype == torch.float32
                vmax = float(c.abs().max())
                bound = T * dt * vmax + 16 * math.sqrt(T * K) * U32 * vmax
                if tol:
                    d = chebyshev_degree(T, tol, c.shape[-2] * c.shape[-1], K)
                    bound += 16 * d ** 1.5 * math.sqrt(K) * U32 * vmax
                err = float((g.double().cpu() - ref).abs().max())
                res[key].append({"grid": list(c.shape), "err": err, "bound": bound})
                assert err <= bound, (device, key, res[key])
        out[device] = res
    return out


@pytest.mark.gpu
@needs_cuda
def test_random_walk_on_cuda_equals_the_cpu_walk():
    res = walk_against_float64((CUDA, "cpu"))   # the CPU's float32 walk (C kernels) obeys the same
    print(json.dumps({d: {k: v for k, v in r.items() if k != "walks"} for d, r in res.items()}))
    # and so the two float32 walks are within the sum of their bounds of each other
    for key in ("exact", "truncated"):
        for x, y, ra, rb in zip(res[CUDA]["walks"][key], res["cpu"]["walks"][key],
                                res[CUDA][key], res["cpu"][key]):
            assert float((x - y).abs().max()) <= ra["bound"] + rb["bound"]


def walk_labels_against_cpu(device: str) -> list[dict]:
    """``walk_labels`` (pad, pool, walk, upsample, argmax) on ``device`` against the CPU, with the
    walked maps each side argmaxes (taken through ``refine``, which returns them unchanged).

    The maps (background + classes, normalised per pixel) are bounded as in
    :func:`walk_against_float64` for T applied t times: ``eps = 2·16·sqrt(t·K)·u + t·||dT||``
    (the measured weight difference of the two devices) on the walked maps (inputs <= 1;
    bilinear upsampling is a convex combination), and the per-pixel normalisation by a sum
    ``S`` of C maps makes that at most ``(1 + C)·eps / S``. So the labels must agree wherever the
    CPU's two best scores are more than twice that apart (random CAMs walk to near-equal maps,
    so a good share of pixels are near-ties: those may differ)."""
    feats, _ = _walk_inputs()
    g = torch.Generator().manual_seed(3)
    ids = [[1, 5, 12], [2, 7]]
    # CAMs at image resolution, sizes not multiples of 8 (padding and cropping on both devices):
    # one blob per class and some noise, so that most pixels have a clear winner after the walk
    full = []
    for i, f in zip(ids, feats):
        h, w = 8 * f.shape[1] - 3, 8 * f.shape[2] - 5
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32),
                                torch.arange(w, dtype=torch.float32), indexing="ij")
        centres = torch.rand(len(i), 2, generator=g) * torch.tensor([h, w])
        sigma = 0.15 * min(h, w)
        blobs = torch.exp(-((ys - centres[:, :1, None]) ** 2 + (xs - centres[:, 1:, None]) ** 2)
                          / (2 * sigma ** 2))
        full.append((0.9 * blobs + 0.1 * torch.rand(len(i), h, w, generator=g)).contiguous())

    def capture(store):
        def refine(p):
            store.append(p.double().cpu())
            return p
        return refine

    on_cpu, on_dev = [[] for _ in ids], [[] for _ in ids]
    cpu = walk_labels(feats, full, ids, BETA, T, RADIUS, 16.0, 0.0,
                      refine=[capture(m) for m in on_cpu])
    dev = walk_labels([f.to(device) for f in feats], [c.to(device) for c in full], ids, BETA, T,
                      RADIUS, 16.0, 0.0, refine=[capture(m) for m in on_dev])
    res = []
    for a, b, c, i, f, ma, mb in zip(dev, cpu, full, ids, feats, on_dev, on_cpu):
        assert a.device.type == torch.device(device).type and a.shape == c.shape[-2:]
        pa, pb = ma[0], mb[0]
        # the walk runs on the feature grid (maps pooled from the CAMs), with each side's own T
        dt = _row_norm_diff(transition_weights(f[None].to(device), BETA, RADIUS),
                            transition_weights(f[None], BETA, RADIUS))
        eps = 2 * 16 * math.sqrt(T * K) * U32 + T * dt
        eps_p = (1 + pb.shape[0]) * eps / float(pb.sum(0).min())
        diff = float((pa - pb).abs().max())
        top = pb.topk(2, dim=0).values
        clear = (top[0] - top[1]) > 2 * eps_p          # no near-tie at this pixel
        agree = float((a.cpu() == b).double().mean())
        res.append({"max_map_diff": diff, "eps": eps_p, "agree": agree,
                    "clear": float(clear.double().mean())})
        assert diff <= eps_p, res
        assert torch.equal(a.cpu()[clear], b[clear]), res
        assert set(b.unique().tolist()) <= {0, *i}
    return res


@pytest.mark.gpu
@needs_cuda
def test_walk_labels_on_cuda_equal_the_cpu_labels():
    res = walk_labels_against_cpu(CUDA)      # asserts per image inside; the figures printed
    print(json.dumps(res))
    assert res and all(r["max_map_diff"] <= r["eps"] for r in res)


# ------------------------------------------- the helpers on the CPU, in every test run (not gpu)
@pytest.mark.slow
def test_walk_against_float64_on_the_cpu():
    """The CPU's float32 walk against the float64 walk, within the bounds the GPU test allows
    CUDA (the helper asserts them), with the figures the GPU test prints and compares."""
    res = walk_against_float64(("cpu",))
    assert list(res) == ["cpu"]
    json.dumps({d: {k: v for k, v in r.items() if k != "walks"} for d, r in res.items()})
    r = res["cpu"]
    assert [len(r[k]) for k in ("weights", "exact", "truncated")] == [2, 2, 2]
    for w in r["weights"]:
        assert 0 < w["dT"] <= w["bound"]           # float32 weights, not float64 ones
    for key in ("exact", "truncated"):
        assert [x["grid"] for x in r[key]] == [[21, 47, 63], [4, 40, 56]]
        assert all(0 < x["err"] <= x["bound"] for x in r[key]), r[key]
        assert [tuple(g.shape) for g in r["walks"][key]] == [(21, 47, 63), (4, 40, 56)]


def test_walk_labels_against_cpu_on_the_cpu():
    """``walk_labels`` on the CPU against itself: the same maps and labels to the bit, and the
    figures the GPU test prints."""
    res = walk_labels_against_cpu("cpu")
    json.dumps(res)
    assert len(res) == 2
    for r in res:
        assert r["max_map_diff"] == 0.0 and r["agree"] == 1.0, res
        assert 0 < r["eps"] < 0.01 and 0.9 < r["clear"] <= 1.0, res
