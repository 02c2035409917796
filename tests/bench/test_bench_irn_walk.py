"""`psa-dist bench random-walk --method irn`: IRN's walk on the sparse operator against its
authors' dense method, each case in a subprocess, on a small grid (the benchmark's figures at
VOC's and COCO's stride-4 grids are in docs/performance.md)."""
from psa_dist.bench.boundary_walk import bench_boundary_walk, synthetic_boundary


def test_the_bench_times_both_and_finds_them_equal(tmp_path):
    res = bench_boundary_walk(tmp_path, t=64, channels=(2,), sizes=("14x17",), repeats=1)
    (row,) = res["rows"]
    assert row["grid"] == [14, 17] and row["dense_s"] > 0 and row["sparse_s"] > 0
    assert row["max_rel_diff"] < 1e-4                     # the exact walk against theirs
    assert row["tol_max_diff"] < 1e-4                     # the truncated walk against the exact
    assert (tmp_path / "bench" / "random_walk_irn.json").is_file()


def test_the_synthetic_boundary_is_high_between_regions_only():
    edge, cams = synthetic_boundary(40, 50, 3)
    assert edge.min() >= 0 and edge.max() <= 1 and cams.shape == (3, 40, 50)
    assert 0.02 < float((edge > 0.3).float().mean()) < 0.5   # walls, not everywhere
