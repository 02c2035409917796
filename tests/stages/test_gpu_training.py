"""Training on CUDA against the CPU: ``train_step`` under fp16 (grad scaler) and bf16 against
float32, the trainer under both AMP settings, SyncBatchNorm under DDP on a one-rank NCCL group,
NCCL collectives (and a 2-rank job where there are two GPUs). The tests are marked ``gpu`` and
skip only where CUDA is absent (``gpu_common``: the tolerances' roundoffs); the step helper also
runs on the CPU, unmarked, so that its code runs in every test run.
"""
import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from psa_dist.config import load_config
from psa_dist.nets.backbones import build_backbone
from psa_dist.nets.checkpoint import load_checkpoint
from psa_dist.nets.models import Classifier
from psa_dist.nets.optim import build_optimizer, build_poly_scheduler
from psa_dist.pipeline import run_pipeline
from psa_dist.engine.loop import train_step
from psa_dist.stages import table

CLS_LOSS = table.kind("cls").losses(None, None)(False)   # the classifier's loss (no settings)
from psa_dist.util.dist import DistInfo, all_reduce_sum, cleanup, init_distributed, wrap_ddp
from tests.gpu_common import CUDA, U_TF32, needs_cuda


# ------------------------------------------------------------------------------ fp16 and bf16
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
        losses.append(float(train_step(model, CLS_LOSS, x, y, opt, sched, scaler, dtype)))
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


def tiny(amp: str) -> dict:
    """The tiny config of the trainer under AMP (``tiny_config``), with ``amp``."""
    return dict(name="amptest", device="cuda", shard_size=4, num_train=16, num_val=2,
                trainers={"train_cls": {"epochs": 2, "log_every": 1, "amp": amp}},
                ray={"enabled": False})


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_the_trainer_on_cuda_under_amp(tmp_path, capfd, amp, tiny_config):
    p = tiny_config(tmp_path / "cfg.yaml", tmp_path / "data", **tiny(amp))
    run_pipeline(load_config(p, [f"out_dir={tmp_path / 'run'}"]), stages=["train_cls"])
    out = capfd.readouterr().out
    name = {"fp16": "float16", "bf16": "bfloat16"}[amp]
    assert f"[cls] precision: autocast {name} (train_cls.amp={amp}) on cuda" in out, out
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


# ------------------------------------------------------------------ SyncBatchNorm, NCCL
class OneRankGroup(DistInfo):
    """A rank of a real NCCL process group of world size 1. ``wrap_ddp`` wraps only when the run is
    distributed (world size > 1); on a machine with one GPU a one-rank NCCL group is the only group
    there is, so this rank counts as distributed to run wrap_ddp's CUDA branch on it."""

    @property
    def distributed(self) -> bool:
        return dist.is_initialized()


@pytest.fixture
def nccl_one_rank(monkeypatch, free_port):
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
def test_nccl_initialisation_and_all_reduce_sum(nccl_one_rank, tmp_path, free_port):
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


# ------------------------------------------- the helpers on the CPU, in every test run (not gpu)
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled, but CUDA is not")
def test_steps_on_the_cpu():
    """``_steps`` as the fp16 / bf16 test calls it, the CPU standing in for CUDA: the float32
    reference is the same on every call, autocast runs in the dtype asked (the recorded conv
    dtypes), and the CPU's bf16 and fp16 meet the bounds asked of CUDA's. The grad scaler is made
    for "cuda" as the trainer makes it: without CUDA it disables itself, and its scale reads 1."""
    ref, none, d32, m32 = _steps("cpu", None)
    again, _, d32b, _ = _steps("cpu", None)
    assert again == ref and torch.equal(d32b, d32) and none == [None] * 4
    b16, _, dbf, mbf = _steps("cpu", torch.bfloat16)
    f16, scales, dfp, mfp = _steps("cpu", torch.float16, fp16_scaler=True)
    assert (m32.conv_dtypes, mbf.conv_dtypes, mfp.conv_dtypes) == (
        ["torch.float32"], ["torch.bfloat16"], ["torch.float16"])
    assert all(p.dtype == torch.float32 for m in (mbf, mfp) for p in m.parameters())
    assert len(scales) == 4 and all(s > 0 and math.log2(s).is_integer() for s in scales), scales
    if not torch.cuda.is_available():
        assert scales == [1.0] * 4, scales
    for losses in (b16, f16):
        assert all(abs(a - b) <= 0.02 * abs(a) for a, b in zip(ref, losses)), (ref, losses)
    for d in (dbf, dfp):
        assert float(nn.functional.cosine_similarity(d, d32, dim=0)) > 0.95

