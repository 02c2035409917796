"""DDP training on CPU with gloo, for real: 2 ranks equal 1 rank on the same global batch; the
loader's epochs are deterministic, split across ranks and skippable; a killed run resumes to the
weights of an uninterrupted one; the torchrun and submitit-local launchers run 2 ranks."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

from psa_dist.nets.backbones import build_backbone
from psa_dist.config import SynthConfig, TrainConfig
from psa_dist.util.dist import init_distributed
from psa_dist.nets.checkpoint import load_checkpoint
from psa_dist.engine.loop import train_step
from psa_dist.stages import table

CLS_LOSS = table.kind("cls").losses(None, None)(False)   # the classifier's loss (no settings)
from psa_dist.nets.models import Classifier, set_bn_eval
from psa_dist.nets.optim import build_optimizer, build_poly_scheduler
from psa_dist.data.shards import split_shards
from psa_dist.data.synth import write_synth
from psa_dist.data.train_data import make_train_loader


def tiny(epochs: int) -> dict:
    """The tiny config of the trainer runs here (``tiny_config``), with ``epochs``."""
    return dict(name="ddptest", device="cpu", shard_size=6, image_size=40, num_train=48, num_val=4,
                trainers={"train_cls": dict(epochs=epochs, crop_size=40, resize_long=[36, 44],
                                            log_every=2, checkpoint_every=3, lr=0.02)},
                model={"freeze_bn": True}, ray={"enabled": False})


def tiny_model():
    torch.manual_seed(0)
    m = Classifier(build_backbone("small"), 6)
    set_bn_eval(m)      # BN statistics per rank would differ from the global batch's on CPU
    return m


def _one_step(model, x, y, net=None):
    opt = build_optimizer(model, 0.05, 5e-4, 0.9, model.new_modules())
    sched = build_poly_scheduler(opt, 10)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    for _ in range(2):
        train_step(net or model, CLS_LOSS, x, y, opt, sched, scaler, None)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ddp_rank(rank, port, x, y, out, kind="cls"):
    """One of 2 gloo ranks: the classifier's steps (or IRN's, ``kind="irn"``) on half the batch."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    from psa_dist.util.dist import cleanup, wrap_ddp
    model, loss = (tiny_model(), None) if kind == "cls" else _irn_model_and_loss()
    net = wrap_ddp(model, info)
    half = x.shape[0] // 2
    sl = slice(rank * half, (rank + 1) * half)
    state = (_one_step(model, x[sl], y[sl], net) if kind == "cls"
             else _irn_steps(model, loss, x[sl], y[sl], net))
    if rank == 0:
        torch.save(state, out)
    cleanup()


def test_two_ranks_equal_one_rank_on_the_global_batch(tmp_path, free_port):
    torch.manual_seed(1)
    x = torch.randn(8, 3, 40, 40)
    y = (torch.rand(8, 6) > 0.6).float()
    torch.set_num_threads(1)
    single = _one_step(tiny_model(), x, y)
    out = tmp_path / "rank0.pt"
    mp.spawn(_ddp_rank, args=(free_port(), x, y, out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    start = tiny_model().state_dict()
    moved = 0
    for k, v in single.items():
        assert torch.allclose(ddp[k], v, atol=1e-5, rtol=1e-4), k
        moved += int(not torch.equal(v, start[k]))
    assert moved > 0    # the steps did change the weights


def _irn_model_and_loss():
    """IRN's boundary branch on a frozen backbone and its relation loss (radius 5 cells)."""
    from psa_dist.config import load_config
    from psa_dist.nets.models import BoundaryNet
    cfg = load_config(None, ["method=irn", "model.irn_radius=5"])
    torch.manual_seed(0)
    model = BoundaryNet(build_backbone("small"))
    return model, table.kind("irn").losses(cfg, cfg.train_irn)(False)


def _irn_steps(model, loss, x, y, net=None):
    opt = build_optimizer(model, 0.1, 1e-4, 0.9, model.new_modules())
    sched = build_poly_scheduler(opt, 10)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    (net or model).train()          # as the loop does each epoch: the backbone stays in eval
    for _ in range(2):
        train_step(net or model, loss, x, y, opt, sched, scaler, None)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_irns_boundary_branch_on_two_ranks_equals_one_rank(tmp_path, free_port):
    """IRN's trainer under DDP: only the head is a DDP parameter (the backbone is frozen and
    keeps its BN statistics); two ranks of half the batch equal one rank of all of it."""
    torch.manual_seed(1)
    x = torch.randn(4, 3, 48, 48)
    y = torch.zeros(4, 48, 48, dtype=torch.long)        # relation labels: classes, bg, 255
    y[:, 8:30, 6:26] = 3
    y[:, 26:44, 28:46] = 5
    y[:, 28:32] = 255
    torch.set_num_threads(1)
    model, loss = _irn_model_and_loss()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    single = _irn_steps(model, loss, x, y)
    out = tmp_path / "rank0.pt"
    mp.spawn(_ddp_rank, args=(free_port(), x, y, out, "irn"), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    for k, v in single.items():
        assert torch.allclose(ddp[k], v, atol=1e-5, rtol=1e-4), k
        if k.startswith("backbone."):
            assert torch.equal(v, start[k]), k         # frozen, BN statistics too
    assert any(not torch.equal(v, start[k]) for k, v in single.items() if k.startswith("head."))


def _failing_rank(rank, port, left):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from psa_dist.util.dist import cleanup
    init_distributed("cpu")
    if rank == 0:
        cleanup(failed=True)        # rank 0 failed: it must leave without waiting for rank 1
        left.touch()
        return
    # rank 1 is busy elsewhere (a collective of the step, a long batch) until rank 0 has left:
    # with a barrier in rank 0's way, neither would move until the process group timed out
    deadline = time.monotonic() + 60
    while not left.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left.exists(), "the failed rank 0 did not leave the process group while rank 1 was busy"
    cleanup(failed=True)


def test_a_failed_rank_leaves_the_process_group_without_waiting_for_the_others(tmp_path,
                                                                                free_port):
    # a rank that raises (a bad file, out of memory) must end its task, so that the job fails now
    # and not after the process group's 30-minute timeout (a whole chain of jobs waits on it)
    # rank 1 asserts, while it is still busy, that rank 0 has left: spawn raises if it has not
    mp.spawn(_failing_rank, args=(free_port(), tmp_path / "rank0-left"), nprocs=2, join=True)
    assert (tmp_path / "rank0-left").exists()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddpdata")
    write_synth(SynthConfig(image_size=40, num_train=48, num_val=4), root, shard_size=6, workers=1,
                progress=False)
    return root


def _batches(data, rank=0, world=1, workers=0, epoch=0, skip=0):
    tcfg = TrainConfig(batch_size=4, crop_size=40, resize_long=[36, 44], num_workers=workers)
    loader = make_train_loader(table.kind("cls").target, split_shards(data, "train"), None, 6, tcfg, [6] * 8,
                               rank=rank, world_size=world, seed=3)
    loader.set_epoch(epoch, skip)
    return list(loader)


def test_loader_epochs_are_deterministic_skippable_and_split_across_ranks(data):
    full = _batches(data)
    assert len(full) == 12
    again = _batches(data)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full, again))
    # resuming after 5 steps: the remaining batches, bit for bit, without decoding the first 5
    rest = _batches(data, skip=5)
    assert len(rest) == 7
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[5:], rest))
    # the same holds with 2 loader workers (batches interleaved worker by worker)
    two = _batches(data, workers=2)
    rest2 = _batches(data, workers=2, skip=3)
    assert len(two) == 12 and all(torch.equal(a[0], b[0]) for a, b in zip(two[3:], rest2))
    # another epoch is another order
    assert not torch.equal(_batches(data, epoch=1)[0][0], full[0][0])
    # two ranks: 6 steps each, disjoint shards (crops differ, so compare un-augmented labels'
    # multiset via the image means would be fragile: check steps and that batches differ)
    r0, r1 = _batches(data, rank=0, world=2), _batches(data, rank=1, world=2)
    assert len(r0) == len(r1) == 6
    assert not any(torch.equal(a[0], b[0]) for a in r0 for b in r1)


def _cli(cfg_path, out, *extra, env=None):
    return [sys.executable, "-m", "psa_dist.cli", "train-cls", str(cfg_path), f"out_dir={out}",
            *extra]


def _weights(out):
    return load_checkpoint(out / "cls" / "checkpoint.pth")["model"]


@pytest.mark.slow
# fit_rule: the rule class by class, whose per-class sums of a part-trained epoch are resumed too
@pytest.mark.parametrize("extra", [[], ["train_cls.fit_target=0.5", "train_cls.fit_each_class=true"]],
                         ids=["poly", "fit_rule"])
def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path, data, extra, tiny_config):
    # with the fit rule, the epoch killed mid-way must also end with the uninterrupted epoch's
    # loss (its first part comes from the checkpoint), or the rule could decide otherwise
    cfg = tiny_config(tmp_path / "cfg.yaml", data, **tiny(epochs=4))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    subprocess.run(_cli(cfg, ref, *extra), check=True, env=env, capture_output=True)
    # the same run, SIGKILLed once a mid-epoch checkpoint (step 9 of 48) is on disk, then rerun
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(cfg, out, *extra), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    log = out / "cls" / "log.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        steps = [json.loads(x)["step"] for x in log.read_text().splitlines()] if log.is_file() else []
        if steps and max(steps) >= 10:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ck = load_checkpoint(out / "cls" / "checkpoint.pth")
    assert 0 < ck["step"] < 48
    res = subprocess.run(_cli(cfg, out, *extra), check=True, env=env, capture_output=True,
                         text=True)
    assert f"resumed from {out / 'cls' / 'checkpoint.pth'}" in res.stdout
    final = _weights(out)
    assert load_checkpoint(out / "cls" / "checkpoint.pth")["step"] == \
        load_checkpoint(ref / "cls" / "checkpoint.pth")["step"]
    if extra:
        markers = [json.loads((o / "stages" / "train_cls.json").read_text()) for o in (ref, out)]
        assert markers[0]["train_loss"] == markers[1]["train_loss"]
        assert markers[0]["fit_epoch"] == markers[1]["fit_epoch"]
        assert markers[0]["class_train_loss"] == markers[1]["class_train_loss"]
    for k, v in _weights(ref).items():
        assert torch.equal(final[k], v), k


@pytest.mark.slow
def test_torchrun_and_submitit_local_run_two_ranks(tmp_path, data, tiny_config, free_port):
    cfg = tiny_config(tmp_path / "cfg.yaml", data, **tiny(epochs=2))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    a = tmp_path / "torchrun"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                f"--master_port={free_port()}", "-m", "psa_dist.cli", "train-cls", str(cfg),
                f"out_dir={a}", "--launcher", "torchrun"]
    subprocess.run(torchrun, check=True, env=env, capture_output=True)
    b = tmp_path / "local"
    res = subprocess.run(_cli(cfg, b, "--launcher", "local", "train_cls.tasks_per_node=2",
                              "train_cls.gpus_per_node=0", "train_cls.cpus_per_task=1"),
                         check=True, env=env, capture_output=True, text=True)
    assert "submitted local job" in res.stdout
    for out in (a, b):
        marker = json.loads((out / "stages" / "train_cls.json").read_text())
        assert marker["world_size"] == 2 and marker["steps"] == 12     # 48 / (4 x 2) x 2 epochs
        lines = [json.loads(x) for x in (out / "cls" / "log.jsonl").read_text().splitlines()]
        assert [x["epoch"] for x in lines if "epoch_seconds" in x] == [1, 2]   # rank 0 logs alone
    # both launchers run the same 2-rank training: same weights
    wa, wb = _weights(a), _weights(b)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
