"""`psa-dist bench random-walk --method irn`: IRN's walk on this project's sparse operator against
the authors' dense method (``core.boundary.boundary_walk_dense_authors``: their padded (hw)^2
transition matrix squared log2(t) times), at the stride-4 grids IRN walks on: VOC's 500x375 image
(94x125 cells) and COCO's 640x480 (120x160). Each case in a fresh subprocess (its own peak RSS);
the dense method runs where it fits ``dense_max_n`` cells, else its memory is reported. Inputs: a
boundary map of ~12 regions (1 on their borders, blurred) and random CAMs.
"""
from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.boundary import boundary_walk, boundary_walk_dense_authors
from .cases import IRN_SIZES
from .random_walk import grid_of, subprocess_case


def synthetic_boundary(h: int, w: int, channels: int, seed: int = 0):
    """A boundary map in [0, 1] (1 where a cell's region differs from a neighbour's, blurred) and
    CAMs in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(12, 2, generator=g) * torch.tensor([h, w])
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    region = ((ys[..., None] - centres[:, 0]) ** 2 + (xs[..., None] - centres[:, 1]) ** 2).argmin(-1)
    edge = torch.zeros(h, w)
    edge[1:] += (region[1:] != region[:-1]).float()
    edge[:, 1:] += (region[:, 1:] != region[:, :-1]).float()
    edge = F.avg_pool2d(edge.clamp(max=1)[None, None], 3, 1, 1)[0, 0].clamp(max=1)
    return edge, torch.rand(channels, h, w, generator=g)


def run_case(method: str, size: str, channels: int, beta: float, t: int, radius: int, tol: float,
             repeats: int, out: str) -> dict:
    """One measurement in this process: the median of ``repeats`` timed runs (after one untimed
    warm-up for the sparse walk; the dense method, minutes at VOC's size, is timed once)."""
    torch.set_num_threads(int(os.environ.get("PSA_BENCH_THREADS", torch.get_num_threads())))
    h, w = grid_of(size, IRN_SIZES)
    edge, cams = synthetic_boundary(h, w, channels)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    def once():
        if method == "sparse":
            return boundary_walk(cams[None], edge[None], beta, t, radius, tol)[0]
        return boundary_walk_dense_authors(cams, edge, beta, t, radius)

    if method == "sparse":
        once()
    times = []
    for _ in range(repeats if method == "sparse" else 1):
        t0 = time.perf_counter()
        res = once()
        times.append(time.perf_counter() - t0)
    torch.save(res, out)
    return {"seconds": sorted(times)[len(times) // 2],
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 - base}


def _case(*args) -> dict:
    return subprocess_case(*args, module=__name__)


def bench_boundary_walk(out_dir, beta: float = 10.0, t: int = 256, radius: int = 5,
                        channels=(3,), sizes=tuple(IRN_SIZES), tol: float = 1e-5,
                        dense_max_n: int = 12000, repeats: int = 3) -> dict:
    rows = []
    for size in sizes:
        h, w = grid_of(size, IRN_SIZES)
        n = h * w
        for c in channels:
            exact = _case("sparse", size, c, beta, t, radius, 0.0, repeats)
            fast = _case("sparse", size, c, beta, t, radius, tol, repeats) if tol else exact
            row = {"size": size, "grid": [h, w], "n": n, "channels": c,
                   "sparse_exact_s": round(exact["seconds"], 4),
                   "sparse_s": round(fast["seconds"], 4),
                   "sparse_peak_mb": round(max(exact["peak_mb"], fast["peak_mb"]), 1),
                   "tol_max_diff": float((fast["output"] - exact["output"]).abs().max())}
            if n <= dense_max_n:
                dense = _case("dense", size, c, beta, t, radius, tol, 1)
                row.update({"dense_s": round(dense["seconds"], 2),
                            "dense_peak_mb": round(dense["peak_mb"], 1),
                            "speedup": round(dense["seconds"] / fast["seconds"], 1),
                            "speedup_exact": round(dense["seconds"] / exact["seconds"], 1),
                            "max_abs_diff": float((dense["output"] - exact["output"]).abs().max()),
                            "max_rel_diff": float((dense["output"] - exact["output"]).abs().max()
                                                  / dense["output"].abs().max())})
            else:
                row.update({"dense_s": None, "speedup": None, "max_abs_diff": None,
                            "dense_peak_mb": round(3 * (n + 0) ** 2 * 4 / 2 ** 20, 1),
                            "dense_note": "not run: T, T^2 and a product of (hw)^2 float32"})
            rows.append(row)
            print(format_row(row), flush=True)
    res = {"bench": "random-walk", "method": "irn", "beta": beta, "t": t, "radius": radius,
           "tol": tol, "threads": torch.get_num_threads(), "device": "cpu", "rows": rows}
    out = Path(out_dir) / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "random_walk_irn.json").write_text(json.dumps(res, indent=1))
    return res


def format_row(r: dict) -> str:
    head = (f"[bench random-walk irn] {r['size']} {r['grid'][0]}x{r['grid'][1]} C={r['channels']}: "
            f"sparse {1000 * r['sparse_s']:.1f} ms (T applied t times: "
            f"{1000 * r['sparse_exact_s']:.1f} ms), peak RSS +{r['sparse_peak_mb']} MB")
    if r["dense_s"] is None:
        return head + f"; the authors' dense method not run (would need {r['dense_peak_mb']} MB)"
    return (head + f"; the authors' dense method {r['dense_s']:.1f} s, peak {r['dense_peak_mb']} "
            f"MB: {r['speedup']}x faster ({r['speedup_exact']}x exact); max |diff| against it "
            f"{r['max_abs_diff']:.1e} ({r['max_rel_diff']:.1e} of its largest value)")
