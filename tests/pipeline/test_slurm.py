"""Training and label jobs on a real SLURM cluster, submitted through submitit (the cluster:
``tests/pipeline/conftest.py``): a 2-task DDP job; the same on two nodes; a job preempted with USR2
that submitit requeues and that resumes from its checkpoint to the uninterrupted weights; a
failing job whose error reaches the caller; a label stage on a Ray cluster inside an allocation,
as a job with its own Ray cluster, and preempted and resumed at its first unfinished shard."""
import functools
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from psa_dist.cluster.launch import Job, make_executor
from psa_dist.cluster.ray_job import AtAddress, RayCluster
from psa_dist.config import load_config
from psa_dist.nets.checkpoint import load_checkpoint
from psa_dist.pipeline import run_pipeline
from psa_dist.stages.label_pool import label_stage_of
from psa_dist.stages.train import run_trainer


pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def weights(out):
    return load_checkpoint(out / "cls" / "checkpoint.pth")["model"]


def sacct_ids(base):
    r = subprocess.run(["sacct", "-n", "-X", "-o", "JobID,State"], capture_output=True, text=True,
                       env={**os.environ, "SLURM_CONF": str(base / "slurm.conf")})
    return r.stdout


@pytest.fixture(scope="module")
def uninterrupted(slurm, cfg_path, tmp_path_factory):
    """A 2-task DDP classifier job on one node, run to the end."""
    out = tmp_path_factory.mktemp("slurm_ref")
    run_pipeline(load_config(cfg_path, [f"out_dir={out}"]), stages=["train_cls"])
    return out


def test_two_task_ddp_job(uninterrupted):
    marker = json.loads((uninterrupted / "stages" / "train_cls.json").read_text())
    assert marker["world_size"] == 2 and marker["steps"] == 36     # 48 / (4 x 2) x 6 epochs
    ck = load_checkpoint(uninterrupted / "cls" / "checkpoint.pth")
    assert ck["step"] == 36 and ck["world_size"] == 2
    logs = list((uninterrupted / "cls" / "submitit").glob("*/*_0_log.out"))
    assert logs and "done: 6 epochs" in logs[0].read_text()


def test_two_node_job_matches_one_node(cfg_path, uninterrupted, tmp_path):
    out = tmp_path / "two_nodes"
    cfg = load_config(cfg_path, [f"out_dir={out}", "train_cls.nodes=2", "train_cls.tasks_per_node=1"])
    run_pipeline(cfg, stages=["train_cls"])
    hosts = {line.split(" on node ")[1].split(",")[0]
             for p in (out / "cls" / "submitit").glob("*/*_log.out")
             for line in p.read_text().splitlines() if line.startswith("[cls] rank ")}
    ref, got = weights(uninterrupted), weights(out)
    assert all(torch.allclose(ref[k], got[k], atol=1e-6) for k in ref)
    assert json.loads((out / "stages" / "train_cls.json").read_text())["world_size"] == 2
    assert hosts == {"n1", "n2"}, hosts


def preempt_when(job, ready) -> None:
    """Once ``ready()``, preempt ``job`` as a scheduler does and release its requeued copy."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not job.done():
        if ready():
            break
        time.sleep(0.05)
    assert not job.done(), "the job ended before it could be preempted"
    # what a preempting scheduler does: USR2 to the job's tasks; submitit checkpoints and requeues
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    # SLURM holds a requeued job ~2 minutes (Reason=BeginTime); release it as an operator would
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        st = subprocess.run(["squeue", "-h", "-j", job.job_id, "-o", "%T %r"], text=True,
                            capture_output=True).stdout.split()
        if st[:2] == ["PENDING", "BeginTime"]:
            subprocess.run(["scontrol", "update", f"JobId={job.job_id}", "StartTime=now"], check=True)
            break
        time.sleep(0.2)


def test_preempted_job_is_requeued_and_resumes(slurm, cfg_path, uninterrupted, tmp_path):
    out = tmp_path / "preempted"
    cfg = load_config(cfg_path, [f"out_dir={out}"])
    folder = out / "cls" / "submitit" / "job"
    job = make_executor(cfg.train_cls, "slurm", folder, "preempt").submit(
        Job(functools.partial(run_trainer, cfg, "cls")))
    log = out / "cls" / "log.jsonl"

    def six_steps():
        steps = [json.loads(x)["step"] for x in log.read_text().splitlines()] if log.is_file() else []
        return bool(steps) and max(steps) >= 6

    preempt_when(job, six_steps)
    result = job.results()[0]
    assert result["steps"] == 36
    text = "\n".join(p.read_text() for p in folder.glob("*_0_log.*"))
    assert "Caught signal SIGUSR2" in text and "resumed from" in text, text[-3000:]
    ref, got = weights(uninterrupted), weights(out)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_failing_job_error_reaches_the_caller(cfg_path, slurm, tmp_path):
    # AffinityNet needs the classifier's checkpoint, which this run directory does not have
    # (its earlier stages are marked done, so the check before the run lets the job start)
    (tmp_path / "fails" / "stages").mkdir(parents=True)
    for done in ("train_cls", "aff_labels"):
        (tmp_path / "fails" / "stages" / f"{done}.json").write_text("{}")
    cfg = load_config(cfg_path, [f"out_dir={tmp_path / 'fails'}", "train_aff.launcher=slurm",
                                 "train_aff.gpus_per_node=0", "train_aff.cpus_per_task=1",
                                 "train_aff.partition=debug", "train_aff.time_min=5"])
    with pytest.raises(Exception, match=r"cls/checkpoint.pth not found"):
        run_pipeline(cfg, stages=["train_aff"])
    assert not (tmp_path / "fails" / "stages" / "train_aff.json").exists()


def test_ray_cluster_in_allocation_runs_a_label_stage(slurm, cfg_path, tmp_path, own_ray_token):
    """launch/ray_slurm.sbatch on two nodes: a Ray head and a worker, CAMs on both."""
    out = tmp_path / "raycams"
    cfg = load_config(cfg_path, [f"out_dir={out}", "train_cls.launcher=inline", "train_cls.epochs=1"])
    run_pipeline(cfg, stages=["train_cls"])
    venv_bin = Path(os.sys.executable).parent
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "PYTHON": os.sys.executable,
           "PSA_RAY_HEAD_IP": "127.0.0.1"}
    res = subprocess.run(
        ["sbatch", "--wait", "--nodes=2", "--cpus-per-task=1", "--time=10",
         f"--output={tmp_path / 'ray-%j.out'}", str(REPO / "launch" / "ray_slurm.sbatch"),
         str(cfg_path), "cams", f"out_dir={out}", "train_cls.launcher=inline", "ray.enabled=true"],
        env=env, text=True, capture_output=True, timeout=400)
    log = "\n".join(p.read_text() for p in tmp_path.glob("ray-*.out"))
    assert res.returncode == 0, log[-4000:]
    assert "2 nodes up" in log
    shards = [json.loads(x) for x in (out / "stages" / "cams.shards.jsonl").read_text().splitlines()]
    assert len(shards) == 8 and len(list((out / "cams").glob("*.tar"))) == 8
    assert len({s["node"] for s in shards}) == 2, shards      # actors on both Ray nodes


def test_label_stage_as_a_submitit_job_with_its_own_ray_cluster(slurm, cfg_path, tmp_path,
                                                                 own_ray_token):
    """ray.launcher=slurm: the stage runs in a 2-node job that starts Ray on both nodes."""
    out = tmp_path / "rayjob"
    base = [f"out_dir={out}", "train_cls.launcher=inline", "train_cls.epochs=1"]
    run_pipeline(load_config(cfg_path, base), stages=["train_cls"])
    cfg = load_config(cfg_path, base + ["ray.enabled=true", "ray.launcher=slurm", "ray.nodes=2",
                                        "ray.cpus_per_task=1", "ray.partition=debug",
                                        "ray.time_min=10"])
    run_pipeline(cfg, stages=["cams"])
    marker = json.loads((out / "stages" / "cams.json").read_text())
    assert marker["shards_done"] == 8 and marker["actors"] == 2
    shards = [json.loads(x) for x in (out / "stages" / "cams.shards.jsonl").read_text().splitlines()]
    assert len({s["node"] for s in shards}) == 2               # actors on both Ray nodes
    assert 0 <= marker["io_wait_share"] < 1



def test_preempted_label_stage_job_is_requeued_and_resumes_at_its_first_unfinished_shard(
        slurm, cfg_path, tmp_path, monkeypatch):
    """A Ray stage job preempted (USR2) after some shards: submitit requeues it, the new attempt
    starts its own Ray cluster and does only the shards the first one had not written."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")           # as submit_ray_job sets them
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t" * 64)
    out = tmp_path / "raypreempt"
    base = [f"out_dir={out}", "train_cls.launcher=inline", "train_cls.epochs=1"]
    run_pipeline(load_config(cfg_path, base), stages=["train_cls"])
    # large scales: shards slow enough that the signal lands with some of them still to do
    cfg = load_config(cfg_path, base + ["ray.enabled=true", "ray.launcher=slurm", "ray.nodes=1",
                                        "ray.cpus_per_task=1", "ray.partition=debug",
                                        "ray.time_min=10", "cams.scales=[1.0,2.0,3.0,4.0]"])
    folder = out / "stages" / "submitit" / "cams-preempt"
    folder.mkdir(parents=True)
    job = make_executor(cfg.ray, "slurm", folder, "ray-preempt").submit(
        Job(RayCluster(cfg.ray, AtAddress(label_stage_of, cfg, "cams"), folder,
                       21000 + os.getpid() % 1000, "cams")))
    log = out / "stages" / "cams.shards.jsonl"
    preempt_when(job, lambda: log.is_file() and len(log.read_text().splitlines()) >= 2)
    res = job.results()[0]
    text = "\n".join(p.read_text() for p in folder.glob("*_0_log.*"))
    assert "Caught signal SIGUSR2" in text, text[-3000:]
    assert res["shards_skipped"] >= 2 and res["shards_done"] + res["shards_skipped"] == 8, res
    done = [json.loads(x)["shard"] for x in log.read_text().splitlines()]
    assert len(done) == len(set(done)) == 8            # every shard written once, none lost
    assert len(list((out / "cams").glob("*.tar"))) == 8


# ----------------------------------------------------------------------------- psa-dist submit
# The whole pipeline as dependent jobs (psa_dist/submit.py), every stage on the real cluster:
# trainers as 2-task / 1-task DDP jobs, label stages on a Ray cluster started in their job.
