"""CAMs and the walk from a ``num_gpus=1`` Ray actor against the CPU: ``run_pool`` with the
project's ``LabelWorker`` (subclassed only to add the CUDA memory it used to each shard's log
line) over the WebDataset shards of a tiny run trained on the CPU. The test is marked ``gpu`` and
skips only where CUDA is absent (``gpu_common``); the helpers also run on a logical Ray GPU, the
worker falling back to the CPU, unmarked, so that their code runs in every test run.
"""
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from psa_dist.config import load_config
from psa_dist.data.shards import decode_mask, decode_npy, iter_shard
from psa_dist.stages.label_pool import LabelWorker, run_pool
from psa_dist.stages.run_dir import Run
from tests.gpu_common import U_TF32, needs_cuda

# the tiny config (``tiny_config``)
TINY = dict(name="gputest", shard_size=3, num_train=12, num_val=3,
            trainers={"train_cls": {"amp": "none"}, "train_aff": {"amp": "none"}},
            cams={"scales": [1.0, 0.5], "batch_size": 2, "amp": "none"}, aff_labels={"crf": False},
            random_walk={"t": 64}, model={"aff_dims": [8, 8, 8, 16]}, ray={"enabled": False})


class DeviceRecordingWorker(LabelWorker):
    """The project's LabelWorker, unchanged, with what its process computed on added to each
    shard's result (and so to the per-shard log): the CUDA memory it used and the devices it saw
    (the worker itself logs its torch device)."""

    def process(self, in_shard: str, out_shard: str) -> dict:
        res = super().process(in_shard, out_shard)
        res["cuda_bytes"] = (torch.cuda.max_memory_allocated() if self.device.type == "cuda"
                             else 0)
        res["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        return res


@pytest.fixture(scope="module")
def trained_cpu(tmp_path_factory, trained_run):
    """A tiny run trained on the CPU with its CPU CAMs, affinity labels and pseudo labels."""
    base = tmp_path_factory.mktemp("gpulabels")
    p, _ = trained_run(base, ["train_cls", "cams", "aff_labels", "train_aff", "random_walk"],
                       overrides=["device=cpu"], **TINY)
    return base, p


@pytest.fixture
def ray_one_gpu(local_ray):
    with local_ray(num_cpus=4, num_gpus=1) as ray:
        # the worker class above travels by value: Ray's workers cannot import this test module
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        yield ray
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _clone(base: Path, name: str, parts) -> Path:
    out = base / name
    markers = {"cls": "train_cls", "aff": "train_aff", "cams": "cams", "aff_labels": "aff_labels"}
    (out / "stages").mkdir(parents=True, exist_ok=True)
    for d in parts:
        shutil.copytree(base / "ref" / d, out / d)
        shutil.copy(base / "ref" / "stages" / f"{markers[d]}.json", out / "stages")
    return out


def _fields(directory: Path, field: str) -> dict:
    dec = decode_npy if field.endswith(".npy") else decode_mask
    return {r["__key__"]: dec(r[field]) for p in sorted(directory.glob("*.tar"))
            for r in iter_shard(p)}


def run_stage_on_gpu_actor(base: Path, cfg_path: Path, out: Path, stage: str,
                           expect_cuda: bool = True) -> list[dict]:
    """``stage`` over the train shards through ``run_pool`` with the recording worker, on the Ray
    instance of this process; returns the per-shard log."""
    cfg = load_config(cfg_path, [f"out_dir={out}", "ray.enabled=true", "device=cuda"])
    run = Run(cfg)
    log = out / "stages" / f"{stage}.shards.jsonl"
    pool = run_pool(run, stage, DeviceRecordingWorker, (stage, cfg), uses_model=True,
                    log_path=log)
    assert pool.gpus == 1 and pool.num_actors == 1           # one actor, holding the GPU
    summary = pool.run(list(zip(run.train_shards, run.label_shards(stage))), run.shard_counts())
    assert summary["failed"] == [] and summary["failed_shards"] == []
    assert summary["shards_done"] == len(run.train_shards) == 4
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines) == 4 and len({x["pid"] for x in lines}) == 1
    assert all(x["pid"] != os.getpid() for x in lines)     # in the actor's process, not here
    assert all(len(x["gpus"]) == 1 for x in lines)         # Ray gave the actor one GPU
    if expect_cuda:
        assert all(x["device"].startswith("cuda") for x in lines), lines
        assert all(x["cuda_bytes"] > 0 for x in lines), lines   # and it computed there
        assert all(x["cuda_visible_devices"] == x["gpus"][0] for x in lines), lines
    return lines


def compare_cams(ref_dir: Path, got_dir: Path) -> dict:
    """CAMs (in [0, 1], stored as float16) on CUDA against the CPU's. The classifier's
    convolutions run in TF32 on CUDA (10-bit mantissa, roundoff 2^-11) and the CPU's in float32;
    the maps are normalised by their maximum, so an error relative to the largest activation
    shows as an absolute one. Measured on the CPU with bf16 autocast instead (roundoff 2^-8, 8
    times TF32's; activations rounded too) these maps are at most 0.071 and on average 0.0022 from
    float32, so TF32 is expected near 0.009 and 0.0003. Allowed: 64 TF32 roundoffs (0.031)
    anywhere plus float16 storage (2^-11 on [0.5, 1)), and 4 roundoffs (0.002) on average."""
    ref, got = _fields(ref_dir, "cam.npy"), _fields(got_dir, "cam.npy")
    assert sorted(ref) == sorted(got) and len(ref) == 12
    diffs = [np.abs(got[k].astype(np.float64) - ref[k].astype(np.float64)) for k in ref]
    assert all(got[k].shape == ref[k].shape for k in ref)
    worst, mean = max(float(d.max()) for d in diffs), float(np.mean([d.mean() for d in diffs]))
    assert worst <= 64 * U_TF32 + 2.0 ** -11, (worst, mean)
    assert mean <= 4 * U_TF32, (worst, mean)
    return {"max": worst, "mean": mean}


def compare_labels(ref_dir: Path, got_dir: Path, field: str = "pseudo.png") -> float:
    """Pseudo labels (argmaxes of walked maps from TF32 features) agree with the CPU's except at
    near-ties: at least 99% of the pixels."""
    ref, got = _fields(ref_dir, field), _fields(got_dir, field)
    assert sorted(ref) == sorted(got) and len(ref) == 12
    same = sum(int((got[k] == ref[k]).sum()) for k in ref)
    total = sum(ref[k].size for k in ref)
    assert same >= 0.99 * total, same / total
    return same / total


@pytest.mark.gpu
@pytest.mark.ray
@needs_cuda
def test_cams_and_walk_from_a_num_gpus_1_actor_equal_the_cpu(trained_cpu, ray_one_gpu):
    base, cfg_path = trained_cpu
    out = _clone(base, "cams_gpu", ("cls",))
    run_stage_on_gpu_actor(base, cfg_path, out, "cams")
    cams = compare_cams(base / "ref" / "cams", out / "cams")
    # the walk from the CPU's CAMs, so that only AffinityNet and the walk run on the GPU
    out = _clone(base, "rw_gpu", ("cls", "aff", "cams"))
    run_stage_on_gpu_actor(base, cfg_path, out, "random_walk")
    agree = compare_labels(base / "ref" / "random_walk", out / "random_walk")
    print(json.dumps({"cams_diff": cams, "pseudo_label_agreement": agree}))
    assert agree >= 0.99 and cams is not None


# ------------------------------------------- the helpers on the CPU, in every test run (not gpu)
@pytest.mark.ray
@pytest.mark.slow
def test_the_actor_helpers_on_a_logical_gpu(trained_cpu, ray_one_gpu):
    """The GPU test's steps where CUDA is absent: Ray's one GPU is logical, so the actor holds it
    and its worker computes on the CPU (``worker_device``); the CPU's outputs against the CPU's.
    (Where CUDA is present Ray's GPU is the real one: the helpers then check CUDA's facts.)"""
    cuda = torch.cuda.is_available()
    base, cfg_path = trained_cpu
    out = _clone(base, "cams_cpu", ("cls",))
    lines = run_stage_on_gpu_actor(base, cfg_path, out, "cams", expect_cuda=cuda)
    assert all(x["cuda_visible_devices"] == x["gpus"][0] for x in lines), lines   # Ray's GPU id
    if not cuda:
        assert {x["device"] for x in lines} == {"cpu"} and {x["cuda_bytes"] for x in lines} == {0}
    cams = compare_cams(base / "ref" / "cams", out / "cams")
    out = _clone(base, "rw_cpu", ("cls", "aff", "cams"))
    run_stage_on_gpu_actor(base, cfg_path, out, "random_walk", expect_cuda=cuda)
    agree = compare_labels(base / "ref" / "random_walk", out / "random_walk")
    print(json.dumps({"cams_diff": cams, "pseudo_label_agreement": agree}))
    assert set(cams) == {"max", "mean"} and 0 <= cams["mean"] <= cams["max"]
    assert cuda or agree == 1.0             # the CPU's walk from the same CAMs: the same labels
