"""`psa-dist bench scale` in small: a synthetic dataset in many shards through the label stages on a
Ray cluster of several nodes (``ray.cluster_utils.Cluster``) and `export`. What is asserted is
what the figures must satisfy whatever the machine's speed, never a timing."""
import json
import math

import pytest

from psa_dist.bench.scale_figures import project, stage_figures


@pytest.mark.slow
@pytest.mark.ray
def test_bench_scale_small(tmp_path):
    from psa_dist.bench.scale import bench_scale
    images, shard_size = 600, 30
    res = bench_scale(tmp_path, images=images, classes=80, image_size=24, shard_size=shard_size,
                      nodes=2, train_images=96,
                      overrides=["train_cls.batch_size=8", "train_aff.batch_size=8"])
    shards = math.ceil(images / shard_size)
    assert res["dataset"]["train_images"] == images and res["dataset"]["train_shards"] == shards
    assert res["training"]["steps"]["train_cls"]["steps"] == 96 // 8
    assert [f["stage"] for f in res["stages"]] == ["cams", "aff_labels", "random_walk"]
    for f in res["stages"]:
        # every shard once, every image once, on the cluster's nodes
        assert f["shards"] == shards and f["images"] == images
        assert f["actors"] == 2 and f["nodes"] == 2
        assert f["failed_samples"] == 0 and f["failed_shards"] == 0
        assert 0 < f["shard_s_min"] <= f["shard_s_median"] <= f["shard_s_max"]
        assert f["longest_over_median"] >= 1
        # the stage cannot take less than its work spread over its actors
        assert f["wall_over_work_per_actor"] >= 1 and f["overhead_ms_per_shard"] >= 0
        assert math.isfinite(f["overhead_steady_ms_per_shard"]) and f["startup_s"] >= 0
        assert f["driver_peak_mb"] > 0 and f["gcs_rss_mb"][1] >= f["gcs_rss_mb"][0] > 0
        assert f["inline_bytes"] > 0 and f["store_created_bytes"] is not None
    exp = res["export"]
    assert exp["images"] == images and exp["failed"] == 0
    assert exp["every_key_once"] and exp["listed"] == exp["listed_unique"] == images
    assert res["projection"] and all(p["efficiency"] <= 1 for p in res["projection"])
    saved = json.loads((tmp_path / "scale.json").read_text())
    assert saved["stages"] == res["stages"] and (tmp_path / "scale.md").is_file()
    # a rerun reuses the dataset and the trained models
    again = bench_scale(tmp_path, images=images, classes=80, image_size=24,
                        shard_size=shard_size, nodes=2, train_images=96,
                        overrides=["train_cls.batch_size=8", "train_aff.batch_size=8"])
    assert again["dataset"]["reused"] and again["export"]["every_key_once"]


def test_stage_figures_and_projection():
    lines = [{"shard": f"s{i}", "out": f"o{i}", "samples": 10, "seconds": s, "pid": i % 2}
             for i, s in enumerate([1.0, 1.0, 2.0, 1.0])]
    arrivals = [(10.5 + t, r) for t, r in zip([1.0, 1.1, 3.0, 2.2], lines)]
    arrivals.sort(key=lambda a: a[0])
    f = stage_figures("cams", lines, arrivals, wall=4.0, actors=2, stage_start=10.0)
    assert f["images"] == 40 and f["shards"] == 4 and f["work_s"] == 5.0
    assert f["longest_over_median"] == 2.0 and f["shard_s_median"] == 1.0
    assert f["overhead_ms_per_shard"] == 1000 * (4.0 * 2 - 5.0) / 4
    assert f["startup_s"] == 0.5       # first line at 11.5, stage from 10.0, its shard 1 s
    # actor 1 finished its last at 12.7, actor 0 at 13.5: 0.8 actor-seconds idle at the tail
    assert f["tail_idle_actor_s"] == 0.8
    rows = project([{**f, "stage": "cams"}], images=82_783, shard_sizes=(500,),
                   s_per_image={"cams": 0.2}, speculate_after=3.0, speculate_min_s=30.0)
    by_g = {r["gpus"]: r for r in rows}
    assert {r["shards"] for r in rows} == {166}
    assert by_g[8]["waves"] == 21 and by_g[32]["waves"] == 6 and by_g[128]["waves"] == 2
    # by hand: u 0.5 s, o = steady overhead (clipped at 0), d = 2.0 - 1.0 s, w = 500 x 0.2 = 100 s
    o = max(0.0, f["overhead_steady_ms_per_shard"] / 1000)
    for g, r in by_g.items():
        t = 0.5 + math.ceil(166 / g) * (100 + o) + 1.0
        assert r["minutes"] == round(t / 60, 2)
        assert r["efficiency"] == round(166 * 100 / g / t, 3)
        assert r["straggler_minutes"] == round((t + 300) / 60, 2)    # 3 x w > 30 s
    assert by_g[128]["efficiency"] < by_g[32]["efficiency"] < by_g[8]["efficiency"] <= 1
    # short shards: a straggler costs speculate_min_s, not 3 x w
    short = project([{**f, "stage": "cams"}], shard_sizes=(10,), gpus=(8,),
                    s_per_image={"cams": 0.2}, speculate_after=3.0, speculate_min_s=30.0)[0]
    assert abs(short["straggler_minutes"] * 60 - short["minutes"] * 60 - 30) < 1.2
