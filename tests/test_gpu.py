"""The CUDA paths, on a real GPU, each against the CPU: the random walk (sparse and truncated), CAMs
and the walk from a ``num_gpus=1`` Ray actor, trainer steps under fp16 (grad scaler) and bf16,
SyncBatchNorm under DDP and NCCL collectives, and the VOC / COCO rehearsal configs cut to a few
images. Every test is marked ``gpu`` and skips only where CUDA is absent; ``bash
launch/gpu_check.sh`` runs them (``pytest -m gpu``) with the GPU benchmarks.

Where a result is compared with the CPU's, the tolerance comes from float32's unit roundoff
``u = 2^-24`` (the walk: elementwise ops only), or from TF32's ``2^-11`` where cuDNN convolutions
run (PyTorch's default ``torch.backends.cudnn.allow_tf32 = True``, which the project keeps).
"""
import json
import math
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from psa_dist.bench.random_walk import synthetic_inputs
from psa_dist.config import load_config
from psa_dist.core.pseudo_labels import walk_labels
from psa_dist.core.random_walk import (
    apply_transition,
    chebyshev_degree,
    random_walk_many,
    transition_weights,
)
from psa_dist.data.shards import decode_mask, decode_npy, iter_shard
from psa_dist.nets.backbones import build_backbone
from psa_dist.nets.checkpoint import load_checkpoint
from psa_dist.nets.models import Classifier
from psa_dist.nets.optim import build_optimizer, build_poly_scheduler
from psa_dist.pipeline import STAGES, run_pipeline
from psa_dist.stages import table
from psa_dist.stages.engine import train_step
from psa_dist.stages.labels import LabelWorker, run_pool
from psa_dist.stages.run_dir import Run
from psa_dist.util.dist import DistInfo, all_reduce_sum, cleanup, init_distributed, wrap_ddp

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is absent")

REPO = Path(__file__).resolve().parent.parent
U32 = 2.0 ** -24           # float32 unit roundoff
U_TF32 = 2.0 ** -11        # TF32 (10-bit mantissa): cuDNN's convolutions by default
CUDA = "cuda"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------- (a) walk
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


# ---------------------------------------------------------------- (b) num_gpus=1 Ray actors
TINY = """
name: gputest
data: {{root: {root}, shard_size: 3, workers: 1}}
synth: {{image_size: 48, num_train: 12, num_val: 3}}
train_cls: {{epochs: 1, batch_size: 4, crop_size: 48, resize_long: [40, 56], num_workers: 0, amp: none}}
train_aff: {{epochs: 1, batch_size: 4, crop_size: 48, resize_long: [40, 56], num_workers: 0, amp: none}}
cams: {{scales: [1.0, 0.5], batch_size: 2, amp: none}}
aff_labels: {{crf: false}}
random_walk: {{t: 64}}
model: {{aff_dims: [8, 8, 8, 16]}}
ray: {{enabled: false}}
"""


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
def trained_cpu(tmp_path_factory):
    """A tiny run trained on the CPU with its CPU CAMs, affinity labels and pseudo labels."""
    base = tmp_path_factory.mktemp("gpulabels")
    p = base / "cfg.yaml"
    p.write_text(TINY.format(root=base / "data"))
    cfg = load_config(p, [f"out_dir={base / 'ref'}", "device=cpu"])
    run_pipeline(cfg, stages=["train_cls", "cams", "aff_labels", "train_aff", "random_walk"])
    return base, p


@pytest.fixture
def ray_one_gpu():
    import ray
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
    # the worker class above travels by value: Ray's workers cannot import this test module
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


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


# ------------------------------------------------------------------------ (c) fp16 and bf16
def _steps(device: str, dtype, n: int = 4, fp16_scaler: bool = False):
    torch.manual_seed(0)
    model = Classifier(build_backbone("small"), 6).to(device)
    start = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(model, 0.01, 5e-4, 0.9, model.new_modules())
    sched = build_poly_scheduler(opt, 10)
    scaler = torch.amp.GradScaler("cuda", enabled=fp16_scaler)    # as the trainer makes it
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 64, 64, generator=g).to(device)
    y = (torch.rand(4, 6, generator=g) > 0.5).float().to(device)
    losses, scales, conv_dtypes = [], [], []
    # the dtype the classifier's last conv computed in: what autocast really did
    model.fc.register_forward_hook(lambda m, i, o: conv_dtypes.append(o.dtype))
    for _ in range(n):
        losses.append(float(train_step(model, "cls", x, y, opt, sched, scaler, dtype)))
        scales.append(float(scaler.get_scale()) if fp16_scaler else None)
    delta = torch.cat([(p.detach() - s).flatten().cpu() for p, s in zip(model.parameters(), start)])
    model.conv_dtypes = sorted(set(map(str, conv_dtypes)))
    return losses, scales, delta, model


@pytest.mark.gpu
@needs_cuda
def test_train_steps_under_fp16_with_the_grad_scaler_and_bf16_follow_float32():
    ref, _, d32, m32 = _steps("cpu", None)                    # the CPU in float32: the reference
    b16, _, dbf, mbf = _steps(CUDA, torch.bfloat16)
    f16, scales, dfp, mfp = _steps(CUDA, torch.float16, fp16_scaler=True)
    print(json.dumps({"fp32_cpu": ref, "bf16_cuda": b16, "fp16_cuda": f16, "scales": scales}))
    for losses in (b16, f16):
        assert all(math.isfinite(v) for v in losses)
    for m in (mbf, mfp):                                       # master weights stay float32
        assert all(p.dtype == torch.float32 and p.is_cuda for p in m.parameters())
    # bf16 (8-bit mantissa, roundoff 2^-8) over a few steps: within 2% of float32, weights moving
    # the same way (as the CPU bf16 test asks)
    assert (m32.conv_dtypes, mbf.conv_dtypes, mfp.conv_dtypes) == (
        ["torch.float32"], ["torch.bfloat16"], ["torch.float16"])   # autocast really ran
    for a, b in zip(ref, b16):
        assert abs(a - b) <= 0.02 * abs(a), (ref, b16)
    cos = float(nn.functional.cosine_similarity(dbf, d32, dim=0))
    assert cos > 0.95 and float(dbf.abs().max()) > 0, cos
    # fp16 with the scaler: the scale is a power of two, halved (and the step skipped) only on an
    # overflow, so at least one of the steps moved the weights; the first loss (the same weights,
    # before any update) is float32's up to fp16's rounding (2^-11)
    assert all(s > 0 and math.isfinite(s) and math.log2(s).is_integer() for s in scales), scales
    assert float(dfp.abs().max()) > 0
    assert abs(f16[0] - ref[0]) <= 0.01 * abs(ref[0]), (ref, f16)
    if scales[-1] == 65536.0:                                  # no overflow: every step taken
        for a, b in zip(ref, f16):
            assert abs(a - b) <= 0.02 * abs(a), (ref, f16)


TRAIN = """
name: amptest
device: cuda
data: {{root: {root}, shard_size: 4, workers: 1}}
synth: {{image_size: 48, num_train: 16, num_val: 2}}
train_cls: {{epochs: 2, batch_size: 4, crop_size: 48, resize_long: [40, 56], num_workers: 0,
            log_every: 1, amp: {amp}}}
ray: {{enabled: false}}
"""


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_the_trainer_on_cuda_under_amp(tmp_path, capfd, amp):
    p = tmp_path / "cfg.yaml"
    p.write_text(TRAIN.format(root=tmp_path / "data", amp=amp))
    run_pipeline(load_config(p, [f"out_dir={tmp_path / 'run'}"]), stages=["train_cls"])
    out = capfd.readouterr().out
    name = {"fp16": "float16", "bf16": "bfloat16"}[amp]
    assert f"[cls] precision: autocast {name} on cuda (train_cls.amp={amp})" in out, out
    assert "device cuda" in out
    log = [json.loads(x) for x in (tmp_path / "run" / "cls" / "log.jsonl").read_text().splitlines()]
    assert len([r for r in log if "epoch_seconds" not in r]) == 8       # 16 / 4 x 2 epochs
    assert all(math.isfinite(r["loss"]) for r in log)
    ck = load_checkpoint(tmp_path / "run" / "cls" / "checkpoint.pth")
    assert ck["step"] == 8
    if amp == "fp16":   # the grad scaler's state, scale included, is in the checkpoint
        s = ck["scaler"]["scale"]
        assert float(s) > 0 and math.isfinite(float(s)), ck["scaler"]
    else:               # bf16 needs no scaler: it is disabled, its state empty
        assert ck["scaler"] == {}


# -------------------------------------------------------------- (d) SyncBatchNorm, (e) NCCL
class OneRankGroup(DistInfo):
    """A rank of a real NCCL process group of world size 1. ``wrap_ddp`` wraps only when the run is
    distributed (world size > 1); on a machine with one GPU a one-rank NCCL group is the only group
    there is, so this rank counts as distributed to run wrap_ddp's CUDA branch on it."""

    @property
    def distributed(self) -> bool:
        return dist.is_initialized()


@pytest.fixture
def nccl_one_rank(monkeypatch):
    """``init_distributed`` as a one-rank torchrun job, then the NCCL group it would join."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    info = init_distributed("cuda")
    assert info.device.type == "cuda" and info.world_size == 1 and not dist.is_initialized()
    dist.init_process_group("nccl", rank=0, world_size=1)
    yield info
    cleanup()
    assert not dist.is_initialized()


def _bn_model():
    torch.manual_seed(0)
    return Classifier(build_backbone("small"), 6)


@pytest.mark.gpu
@needs_cuda
def test_syncbatchnorm_under_ddp_on_nccl(nccl_one_rank):
    info = nccl_one_rank
    assert dist.get_backend() == "nccl"
    model = _bn_model().to(info.device)
    net = wrap_ddp(model, OneRankGroup(info.rank, info.world_size, info.local_rank, info.device))
    assert isinstance(net, nn.parallel.DistributedDataParallel)
    assert net.device_ids == [info.device.index]
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, nn.SyncBatchNorm) for m in bns)
    ref = _bn_model()                                          # plain BatchNorm on the CPU
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 64, 64, generator=g)
    y = (torch.rand(4, 6, generator=g) > 0.5).float()
    net.train()
    loss = Classifier.loss(net(x.to(info.device)).float(), y.to(info.device))
    loss.backward()
    rloss = Classifier.loss(ref(x), y)
    rloss.backward()
    # TF32 convolutions: the loss to ~40 roundoffs of 2^-11, relative
    assert abs(float(loss) - float(rloss)) <= 40 * U_TF32 * abs(float(rloss))
    grads = [(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters())]
    assert all(a is not None and torch.isfinite(a).all() for a, _ in grads)
    ga = torch.cat([a.flatten().cpu() for a, _ in grads])
    gb = torch.cat([b.flatten() for _, b in grads])
    assert float(nn.functional.cosine_similarity(ga, gb, dim=0)) > 0.999
    # the running statistics were updated as plain BN's over the same batch
    for m, r in zip([m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)],
                    [m for m in ref.modules() if isinstance(m, nn.BatchNorm2d)]):
        assert torch.allclose(m.running_mean.cpu(), r.running_mean, atol=1e-3, rtol=1e-2)
        assert int(m.num_batches_tracked) == 1


def _two_ranks(rank: int, port: int, out: str):
    """A 2-rank job on 2 GPUs through the project's init path (NCCL inside init_distributed):
    all_reduce_sum, and SyncBN + DDP from wrap_ddp on each rank's half of one batch."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = init_distributed("cuda")
    s = all_reduce_sum(torch.tensor([rank + 1.0, 10.0 * rank], device=info.device))
    model = _bn_model().to(info.device)
    net = wrap_ddp(model, info)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 3, 64, 64, generator=g)
    net(x[rank * 4:(rank + 1) * 4].to(info.device)).sum().backward()
    bn = next(m for m in model.modules() if isinstance(m, nn.SyncBatchNorm))
    if rank == 0:
        torch.save({"sum": s.cpu(), "backend": dist.get_backend(), "device": str(info.device),
                    "sync": all(isinstance(m, nn.SyncBatchNorm) for m in model.modules()
                                if isinstance(m, nn.modules.batchnorm._BatchNorm)),
                    "running_mean": bn.running_mean.cpu()}, out)
    cleanup()


@pytest.mark.gpu
@needs_cuda
def test_nccl_initialisation_and_all_reduce_sum(nccl_one_rank, tmp_path):
    info = nccl_one_rank
    assert dist.get_backend() == "nccl" and dist.get_world_size() == 1
    t = torch.arange(4.0, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)                   # a real NCCL collective
    dist.barrier()
    assert t.device.type == "cuda" and torch.equal(t.cpu(), torch.arange(4.0))
    assert torch.equal(all_reduce_sum(t.clone()).cpu(), torch.arange(4.0))
    if torch.cuda.device_count() < 2:
        # NCCL refuses two ranks on one device: the 2-rank part needs 2 GPUs
        print("one GPU: the 2-rank NCCL job is not run")
        return
    out = tmp_path / "rank0.pt"
    cleanup()                                                  # the 2-rank job's own group
    mp.spawn(_two_ranks, args=(free_port(), str(out)), nprocs=2, join=True)
    res = torch.load(out, weights_only=True)
    assert res["backend"] == "nccl" and res["device"] == "cuda:0" and res["sync"]
    assert torch.equal(res["sum"], torch.tensor([3.0, 10.0]))   # 1+2, 0+10
    # SyncBN's statistics are the whole batch's: plain BN on the CPU over all 8 images
    ref = _bn_model()
    g = torch.Generator().manual_seed(2)
    ref(torch.randn(8, 3, 64, 64, generator=g))
    bn = next(m for m in ref.modules() if isinstance(m, nn.BatchNorm2d))
    assert torch.allclose(res["running_mean"], bn.running_mean, atol=1e-3, rtol=1e-2)


# --------------------------------------------------------------- (f) rehearsal configs, cut
REHEARSALS = ["voc_rehearsal", "coco_rehearsal"]


def rehearsal_overrides(tmp: Path, device: str = CUDA) -> list[str]:
    """The rehearsal config cut to 4 train / 2 val images, one epoch per trainer, inline
    trainers, on ``device``; everything else (backbone, sizes, crops, scales, CRF) as written."""
    over = [f"out_dir={tmp / 'run'}", f"data.root={tmp / 'data'}", f"device={device}",
            "synth.num_train=4", "synth.num_val=2", "data.shard_size=2", "data.workers=2",
            "ray.enabled=true", "ray.num_actors=0"]
    for t in ("train_cls", "train_aff", "train_seg"):
        over += [f"{t}.epochs=1", f"{t}.batch_size=2", f"{t}.num_workers=1",
                 f"{t}.launcher=inline", f"{t}.stop_patience=null", f"{t}.log_every=1"]
    return over


def run_rehearsal(name: str, tmp: Path, device: str = CUDA):
    """The cut rehearsal config ``name`` through ``run_pipeline`` on a Ray instance with the
    device's GPUs; returns its config and run directory."""
    path = REPO / "configs" / f"{name}.yaml"
    if not path.is_file():
        pytest.fail(f"{path.relative_to(REPO)} does not exist: the rehearsal config (issue #17: "
                    f"real sizes, synthetic data, random init) must be written before this test "
                    f"can check it on the GPU")
    cfg = load_config(path, rehearsal_overrides(tmp, device))
    assert cfg.data.source == "synth", f"{path.name}: a rehearsal runs on synthetic data"
    import ray
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(num_cpus=4, num_gpus=1 if device.startswith("cuda") else 0, include_dashboard=False,
             _temp_dir=ray_tmp, log_to_driver=False)
    try:
        assert run_pipeline(cfg) == 0
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return cfg, tmp / "run"


def check_rehearsal(cfg, run: Path, out: str, device: str = CUDA) -> dict:
    """Every stage's marker is there; each trainer said it ran on ``device`` (its rank line and
    its precision line) and logged finite losses; each label stage wrote both shards, none failed;
    the model stages ran on one actor per GPU."""
    kind = torch.device(device).type
    for stage in STAGES:
        assert (run / "stages" / f"{stage}.json").is_file(), f"{cfg.name}: no marker for {stage}"
    models = [m for s in STAGES if table.stage(s).kind == "train" for m in table.stage(s).models
              if m != "seg_full" or cfg.seg_full]
    lines = out.splitlines()
    seen = {}
    for m in models:
        rank = [x for x in lines if x.startswith(f"[{m}] rank 0/1 on node")]
        assert rank and f"device {kind}" in rank[0], (m, rank, out[-3000:])
        prec = [x for x in lines if x.startswith(f"[{m}] precision:")]
        assert prec and f"on {kind}" in prec[0], (m, prec)
        log = [json.loads(x) for x in (run / m / "log.jsonl").read_text().splitlines()]
        assert log and all(math.isfinite(r["loss"]) for r in log if "loss" in r), (m, log)
        seen[m] = prec[0]
    for stage in ("cams", "aff_labels", "random_walk"):
        marker = json.loads((run / "stages" / f"{stage}.json").read_text())
        assert marker["failed"] == [] and marker["shards_done"] == 2, (stage, marker)
        if kind == "cuda" and stage != "aff_labels":
            assert marker["actors"] == 1, (stage, marker)          # one actor, on the one GPU
    return seen


@pytest.mark.gpu
@pytest.mark.slow
@needs_cuda
@pytest.mark.timeout(200)
@pytest.mark.parametrize("name", REHEARSALS)
def test_rehearsal_config_cut_to_a_few_images_runs_on_cuda(name, tmp_path, capfd):
    cfg, run = run_rehearsal(name, tmp_path, CUDA)
    print(json.dumps(check_rehearsal(cfg, run, capfd.readouterr().out, CUDA)))
