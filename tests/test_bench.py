"""The benchmarks run end to end and report what they claim to measure (not how fast: that is
machine-dependent and read from their output, never asserted)."""
import json

import pytest
import torch

from psa_dist.bench.random_walk import bench_random_walk, run_case, synthetic_inputs
from psa_dist.config import load_config
from psa_dist.core.random_walk import random_walk, random_walk_dense


def test_bench_random_walk_compares_equal_outputs(tmp_path):
    res = bench_random_walk(tmp_path, t=64, channels=(2,), batch=3, sizes=("9x11",))
    (row,) = res["rows"]
    assert row["grid"] == [9, 11] and row["channels"] == 2
    assert row["batch_equal"] is True
    assert row["max_abs_diff"] < 1e-4 and row["dense_s"] > 0 and row["speedup"] > 0
    # the baseline is the authors' T, whose border differs: its own figure, not zero
    assert row["border_diff"] > 1e-4 and 0 <= row["border_label_share"] <= 1
    assert row["sparse_exact_batch3_s"] > 0       # the t-step walk, timed beside the truncated one
    assert json.loads((tmp_path / "bench" / "random_walk.json").read_text())["rows"] == res["rows"]


def test_bench_dense_case_is_the_walk(tmp_path):
    # The dense baselines the benchmark times: the authors' T exactly, and ours (random_walk's).
    out = tmp_path / "o.pt"
    feats, cams = synthetic_inputs(6, 7, 2, seed=0)
    run_case("dense_ours", "6x7", 2, 1, 8.0, 16, 5, 0.0, str(out))
    torch.testing.assert_close(torch.load(out), random_walk(cams, feats, t=16), atol=1e-5, rtol=1e-4)
    run_case("dense", "6x7", 2, 1, 8.0, 16, 5, 0.0, str(out))
    torch.testing.assert_close(torch.load(out), random_walk_dense(cams, feats, 8.0, 16, 5,
                                                                  border="authors"),
                               atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="HxW"):
        run_case("sparse", "big", 2, 1, 8.0, 16, 5, 0.0, str(out))


@pytest.mark.slow
def test_bench_cams_runs_stage_and_bare_forward(tmp_path):
    from psa_dist.bench.labels import bench_cams
    cfg = load_config("configs/demo.yaml", [f"out_dir={tmp_path}", "synth.image_size=48",
                                            "cams.scales=[1.0, 0.5]"])
    res = bench_cams(cfg, images=6)
    assert res["images"] == 6 and 0 < res["ratio"] < 2
    assert (tmp_path / "bench" / "cams.json").is_file()


@pytest.mark.slow
@pytest.mark.ray
def test_bench_scaling_on_ray(tmp_path):
    from psa_dist.bench.labels import bench_scaling
    cfg = load_config("configs/demo.yaml", [f"out_dir={tmp_path}", "synth.image_size=48",
                                            "cams.scales=[1.0]", "cams.flip=false"])
    res = bench_scaling(cfg, actors=(1, 2), images=8, shards_per_run=4, tiny_shards=(6, 12))
    assert [r["actors"] for r in res["rows"]] == [1, 2]
    assert [r["shards"] for r in res["tiny"]] == [6, 12]
    assert all(r["shards_per_s"] > 0 for r in res["tiny"])
