"""`psa-dist bench random-walk`: the project's sparse random walk against the authors' dense one.

The authors' ``infer_aff`` scatters the neighbour affinities into a dense N×N matrix, normalises
it, squares it log2(t) times and multiplies the CAMs by the result: O(N^3) time, O(N^2) memory.
The baseline is their matrix exactly (``transition_matrix_authors``: their pairs start away from
the border); the sparse walk's error is measured against the dense walk with this project's T
(every pair inside the image), and what the border convention changes is its own figure.
:func:`psa_dist.random_walk.random_walk` applies the same operator t times as 69 shifted
multiply-adds: O(t·69·N·C) time, O(69·N) memory, or (``tol`` > 0, the default of
``random_walk.tol``) the same T^t from a truncated Chebyshev expansion within tol of it, in about a
third of the applications of T. All run here on the same inputs with the same
beta and t, at the feature-grid sizes of real images, each case in a fresh subprocess so that its
peak memory (RSS) is its own. Inputs: AffinityNet-like features (448 channels, piecewise-constant
regions plus noise, so that affinities are high inside regions and low across) and random CAMs.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..core.random_walk import (
    dense_from_weights,
    random_walk_many,
    transition_matrix_authors,
    transition_weights,
)
from .cases import SIZES

DENSE_MAX_N = 6000          # above this the dense method is not run: its memory is reported instead
REPEATS = 3                 # timed runs per case, after one warm-up; the median is reported


def grid_of(size: str, sizes: dict = SIZES) -> tuple[int, int]:
    """A named size (``voc-s8``, ... of ``sizes``) or ``HxW``."""
    if size in sizes:
        return sizes[size]
    try:
        h, w = (int(v) for v in size.lower().split("x"))
        return h, w
    except ValueError:
        raise ValueError(f"bench random-walk: size {size!r} is neither one of {sorted(sizes)} "
                         f"nor HxW") from None


def synthetic_inputs(h: int, w: int, channels: int, dim: int = 448, seed: int = 0):
    """Features with ~12 regions of constant embedding plus noise, and CAMs in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(12, 2, generator=g) * torch.tensor([h, w])
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    d = (ys[..., None] - centres[:, 0]) ** 2 + (xs[..., None] - centres[:, 1]) ** 2
    region = d.argmin(-1)
    emb = torch.rand(12, dim, generator=g) * 2.0
    feats = emb[region].permute(2, 0, 1) + 0.05 * torch.randn(dim, h, w, generator=g)
    cams = torch.rand(channels, h, w, generator=g)
    return feats.contiguous(), cams


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_case(method: str, size: str, channels: int, batch: int, beta: float, t: int, radius: int,
             tol: float, out: str) -> dict:
    """One measurement, in this process: time per image (the median of ``REPEATS`` runs after one
    untimed warm-up, which pays for thread-pool start-up and first-touch page faults) and the peak
    RSS it added."""
    torch.set_num_threads(int(os.environ.get("PSA_BENCH_THREADS", torch.get_num_threads())))
    h, w = grid_of(size)
    inputs = [synthetic_inputs(h, w, channels, seed=i) for i in range(batch)]
    base = _peak_rss_mb()

    def once():
        if method == "sparse":
            return random_walk_many([c for _, c in inputs], [f for f, _ in inputs], beta, t,
                                    radius, tol)[0]
        # The authors' method exactly: their T (their pair window at the border), log2(t)
        # squarings, one product; "dense_ours": the same with this project's T.
        feats, cams = inputs[0]
        tm = (transition_matrix_authors(feats, beta, radius) if method == "dense" else
              dense_from_weights(transition_weights(feats[None], beta, radius)[0], radius))
        for _ in range(max(t.bit_length() - 1, 0)):
            tm = tm @ tm
        return (tm @ cams.reshape(channels, -1).T).T.reshape(channels, h, w)

    once()
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        res = once()
        times.append(time.perf_counter() - t0)
    torch.save(res, out)
    return {"seconds_per_image": sorted(times)[len(times) // 2] / batch,
            "peak_mb": _peak_rss_mb() - base}


def subprocess_case(*args, module: str = __name__) -> dict:
    """``module``'s ``run_case(*args, out)`` in a fresh process (its own peak RSS), with its
    output tensor."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "out.pt")
        code = (f"import json,sys; from {module} import run_case; "
                "print(json.dumps(run_case(*json.loads(sys.argv[1]))))")
        proc = subprocess.run([sys.executable, "-c", code, json.dumps([*args, out])],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"bench random-walk case {args} failed:\n{proc.stderr[-2000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["output"] = torch.load(out, weights_only=True)
        return res


def bench_random_walk(out_dir: str | Path, beta: float = 8.0, t: int = 256, radius: int = 5,
                      channels=(3, 21), batch: int = 8, sizes=tuple(SIZES), tol: float = 1e-5) -> dict:
    rows = []
    for size in sizes:
        h, w = grid_of(size)
        n = h * w
        for c in channels:
            one = subprocess_case("sparse", size, c, 1, beta, t, radius, tol)
            many = subprocess_case("sparse", size, c, batch, beta, t, radius, tol)
            # the same walk with T applied t times (tol 0), batched: what the truncation saves
            exact = subprocess_case("sparse", size, c, batch, beta, t, radius, 0.0) if tol else many
            row = {"size": size, "grid": [h, w], "n": n, "channels": c,
                   "sparse_s": round(one["seconds_per_image"], 4),
                   f"sparse_batch{batch}_s": round(many["seconds_per_image"], 4),
                   "sparse_peak_mb": round(one["peak_mb"], 1),
                   f"sparse_exact_batch{batch}_s": round(exact["seconds_per_image"], 4),
                   # what the walk holds: K weight maps (twice for the truncated walk: T and 2T),
                   # the maps, two padded buffers (one) and the sum (the output)
                   "sparse_working_mb": round(((138 + 4 * c) if tol else (69 + 3 * c)) * n * 4
                                              / 2 ** 20, 2),
                   "batch_equal": bool(torch.equal(one["output"], many["output"]))}
            if n <= DENSE_MAX_N:
                dense = subprocess_case("dense", size, c, 1, beta, t, radius, tol)
                ours = subprocess_case("dense_ours", size, c, 1, beta, t, radius, tol)
                best = min(one["seconds_per_image"], many["seconds_per_image"])
                row.update({"dense_s": round(dense["seconds_per_image"], 3),
                            "dense_peak_mb": round(dense["peak_mb"], 1),
                            "speedup": round(dense["seconds_per_image"] / best, 1),
                            # the sparse walk against the dense one with the same T: its error
                            "max_abs_diff": float((ours["output"] - one["output"]).abs().max()),
                            # the authors' T against ours: what their border convention changes
                            "border_diff": float((dense["output"] - ours["output"]).abs().max()),
                            "border_label_share": float((dense["output"].argmax(0) !=
                                                         ours["output"].argmax(0)).float().mean())})
            else:
                row.update({"dense_s": None, "speedup": None, "max_abs_diff": None,
                            "border_diff": None, "border_label_share": None,
                            "dense_peak_mb": round(3 * n * n * 4 / 2 ** 20, 1),
                            "dense_note": "not run: needs this much memory for T, T² and a "
                                          "product, and ~16·N³ flops"})
            rows.append(row)
            print(_format_row(row, batch), flush=True)
    res = {"bench": "random-walk", "beta": beta, "t": t, "radius": radius, "tol": tol, "batch": batch,
           "threads": torch.get_num_threads(), "device": "cpu", "rows": rows}
    out = Path(out_dir) / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "random_walk.json").write_text(json.dumps(res, indent=1))
    return res


def _format_row(r: dict, batch: int) -> str:
    head = (f"[bench random-walk] {r['size']} {r['grid'][0]}x{r['grid'][1]} C={r['channels']}: "
            f"sparse {r['sparse_s'] * 1000:.1f} ms/img (batch of {batch}: "
            f"{r[f'sparse_batch{batch}_s'] * 1000:.1f} ms/img, equal={r['batch_equal']}; "
            f"T applied t times: {r[f'sparse_exact_batch{batch}_s'] * 1000:.1f} ms/img), "
            f"holds {r['sparse_working_mb']} MB (peak RSS +{r['sparse_peak_mb']} MB)")
    if r["dense_s"] is None:
        return head + f"; dense not run (would need {r['dense_peak_mb']} MB)"
    return (head + f"; dense {r['dense_s']:.2f} s/img, peak {r['dense_peak_mb']} MB: "
            f"{r['speedup']}x faster; max |diff| against the dense walk with the same T "
            f"{r['max_abs_diff']:.1e}; the authors' border against ours: max |diff| "
            f"{r['border_diff']:.1e}, {100 * r['border_label_share']:.2f}% of cells' argmax")
