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


def _naive_hours(images, epochs, seconds, divisor, gpus, efficiency):
    gpu_seconds = seconds / divisor
    return images * epochs * gpu_seconds / (gpus * efficiency) / 3600


def test_bench_cost_extrapolation_is_the_stated_formula():
    from psa_dist.bench.cost_report import extrapolate
    row = {"dataset": "voc", "precision": "float32", "device": "cpu", "tar_bytes": 1024}
    rows = [{**row, "stage": "cams", "seconds": 60.0},
            {**row, "stage": "cams", "device": "cuda", "precision": "bf16", "seconds": 0.5},
            {**row, "stage": "aff_labels", "seconds": 2.0},
            {**row, "stage": "aff_labels", "device": "cuda", "seconds": 0.1},   # not used: the CRF
            {**row, "stage": "train_cls", "seconds": 30.0, "tar_bytes": 10**8},
            {**row, "stage": "train_aff", "seconds": 1.0, "error": "exit 1"}]      # left out
    plan = {"voc": {"images": 1000, "epochs": {"train_cls": 3}, "checkpoints": {},
                    "sample_tar_bytes": 2048}}
    ex = extrapolate(rows, plan, gpu_speedup=100.0, efficiency=0.5, cpus_per_gpu=4, gpus=(2, 8))
    t = {r["stage"]: r for r in ex["time"]}
    assert set(t) == {"cams", "aff_labels", "train_cls", "total"}
    assert t["cams"]["hours"]["2"] == pytest.approx(_naive_hours(1000, 1, 0.5, 1, 2, 0.5))
    assert t["aff_labels"]["hours"]["8"] == pytest.approx(_naive_hours(1000, 1, 2.0, 4, 8, 0.5))
    assert t["train_cls"]["hours"]["8"] == pytest.approx(_naive_hours(1000, 3, 30.0, 100, 8, 0.5))
    assert t["total"]["hours"]["2"] == pytest.approx(sum(t[s]["hours"]["2"] for s in t if s != "total"))
    gb = {s["what"]: s["total_gb"] for s in ex["storage"]}
    assert gb["cams"] == pytest.approx(1000 * 1024 / 1e9)
    assert gb["train_cls checkpoint"] == pytest.approx(0.1)
    assert gb["total"] == pytest.approx(sum(v for k, v in gb.items() if k != "total"))


@pytest.mark.slow
def test_bench_cost_tiny_cut(tmp_path):
    # The real command on a tiny cut: small networks, images and crops at 1/8 of the real size.
    from psa_dist.cli import main
    stages = ["train_cls", "aff_labels", "random_walk"]
    rc = main(["bench", "cost", "--dataset", "voc", "--amp", "both",
               "--devices", "cpu",     # the CPU's formula below holds on a CUDA machine too
               "--stages", *stages,
               "--size-scale", "0.125", "--gpu-speedup", "50", "--out", str(tmp_path),
               "model.backbone=small", "model.segmenter=light", "model.aff_dims=null",
               "model.frozen_layers=[]"])
    assert rc == 0
    res = json.loads((tmp_path / "cost.json").read_text())
    assert res["devices"]["cpu"] and "threads" in res["devices"]["cpu"]     # the CPU named
    assert (tmp_path / "cost.md").is_file() and (tmp_path / "run_info.json").is_file()
    assert res["partial"] is False and {r["device"] for r in res["rows"]} == {"cpu"}
    rows = {(r["stage"], r["precision"]): r for r in res["rows"]}
    assert rows["train_cls", "float32"]["batch"] == 1      # the CPU's default: one image a step
    # every stage asked; the trainer in both precisions, the label stages in float32 (no amp)
    assert set(rows) == {("train_cls", "float32"), ("train_cls", "bf16"),
                         ("aff_labels", "float32"), ("random_walk", "float32")}
    for r in rows.values():
        assert r["seconds"] > 0 and r["output_bytes"] > 0 and r["tar_bytes"] >= r["output_bytes"]
        assert r["peak_mb"] >= 0 and r["size"] == [47, 62]
    cfg = load_config("configs/voc_resnet38.yaml")
    a = res["extrapolation"]["assumptions"]
    assert (a["gpu_speedup"], a["efficiency"], a["cpus_per_gpu"]) == (50.0, 0.9, 8)
    assert a["cpu_gflops"] > 0 and a["gpu_tflops"] is None        # set, not derived
    hours = {r["stage"]: r["hours"] for r in res["extrapolation"]["time"]}
    assert set(hours) == {*stages, "total"}
    for g in (8, 32, 128):
        assert hours["train_cls"][str(g)] == pytest.approx(_naive_hours(
            10582, cfg.train_cls.epochs, rows["train_cls", "float32"]["seconds"], 50, g, 0.9))
        assert hours["aff_labels"][str(g)] == pytest.approx(_naive_hours(
            10582, 1, rows["aff_labels", "float32"]["seconds"], 8, g, 0.9))
        assert hours["random_walk"][str(g)] == pytest.approx(_naive_hours(
            10582, 1, rows["random_walk", "float32"]["seconds"], 50, g, 0.9))
    store = {s["what"]: s for s in res["extrapolation"]["storage"]}
    assert store["random_walk"]["total_gb"] == pytest.approx(
        10582 * rows["random_walk", "float32"]["tar_bytes"] / 1e9)


def test_cpu_conv_gflops_against_a_timed_matmul_of_the_same_work():
    # the calibration the GPU speed-up is derived from: within a factor of 8 of a plain float32
    # matmul doing the same multiply-adds (im2col of the same convolution), timed here
    import time
    import torch
    from psa_dist.bench.cost import cpu_conv_gflops
    conv = cpu_conv_gflops()
    a, b = torch.randn(4 * 56 * 56, 256 * 9), torch.randn(256 * 9, 256)
    a @ b
    t0 = time.perf_counter()
    a @ b
    mm = 2 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - t0) / 1e9
    assert mm / 8 < conv < mm * 8, (conv, mm)
