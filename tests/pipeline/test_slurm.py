"""Training jobs on a real SLURM cluster, submitted through submitit.

The fixture installs (if needed) and starts a two-node cluster on this machine with
``launch/slurm_up.sh``: munged, MariaDB + slurmdbd, slurmctld and two slurmd (n1, n2), and stops
it by recorded PIDs afterwards. The tests: a 2-task DDP job; the same on two nodes; a job preempted
with USR2 that submitit requeues and that resumes from its checkpoint to the uninterrupted weights;
a failing job whose error reaches the caller; `psa-dist submit`'s chain of dependent jobs run to
the report, a chain whose first job fails leaving the later ones never run, and a failed step
requeued under the same job id: once and then through, or until its retries are spent."""
import functools
import json
import os
import random
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

from psa_dist.cluster.launch import Job, make_executor
from psa_dist.cluster.ray_job import AtAddress, RayCluster
from psa_dist.config import SynthConfig, load_config
from psa_dist.data.synth import write_synth
from psa_dist.nets.checkpoint import load_checkpoint
from psa_dist.pipeline import run_pipeline
from psa_dist.stages import table
from psa_dist.stages.label_pool import label_stage_of
from psa_dist.stages.train import run_trainer
from psa_dist.submit import submit_chain

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]

# the tiny config (``tiny_config``)
TINY = dict(name="slurmtest", device="cpu", shard_size=6, num_train=48, num_val=4,
            trainers={"train_cls": dict(epochs=6, log_every=2, checkpoint_every=2, lr=0.02,
                                        launcher="slurm", partition="debug", gpus_per_node=0,
                                        tasks_per_node=2, cpus_per_task=1, time_min=10)},
            model={"freeze_bn": True}, ray={"enabled": False})


@pytest.fixture(scope="module")
def slurm():
    # not under pytest's 0700 temp root: munged needs every directory above its socket executable
    base = Path(tempfile.mkdtemp(prefix="psa-slurm-", dir="/tmp"))
    env = {**os.environ, "SLURM_BASE": str(base), "NODES": "n1 n2",
           "SLURM_PORT_BASE": str(random.Random().randrange(20000, 30000, 20))}
    up = subprocess.run(["bash", str(REPO / "launch" / "slurm_up.sh")], env=env, text=True,
                        capture_output=True)
    assert up.returncode == 0, f"slurm_up.sh failed:\n{up.stdout}\n{up.stderr}"
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "PSA_MASTER_ADDR")}
    # the simulated nodes' names do not resolve: rendezvous on this host
    os.environ.update(SLURM_CONF=str(base / "slurm.conf"), PSA_MASTER_ADDR="127.0.0.1",
                      OMP_NUM_THREADS="1")
    yield base
    subprocess.run(["bash", str(REPO / "launch" / "slurm_down.sh")], env={**env, "PURGE": "1"},
                   capture_output=True)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def cfg_path(tmp_path_factory, tiny_config):
    d = tmp_path_factory.mktemp("slurmcfg")
    write_synth(SynthConfig(image_size=48, num_train=48, num_val=4), d / "data", shard_size=6,
                workers=1, progress=False)
    return tiny_config(d / "cfg.yaml", d / "data", **TINY)


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


def test_ray_cluster_in_allocation_runs_a_label_stage(slurm, cfg_path, tmp_path):
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


def test_label_stage_as_a_submitit_job_with_its_own_ray_cluster(slurm, cfg_path, tmp_path):
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
CHAIN_OVERRIDES = ["train_cls.epochs=1", "train_cls.checkpoint_every=50", "aff_labels.crf=false",
                   "random_walk.t=16", "ray.enabled=true", "ray.nodes=1", "ray.cpus_per_task=1",
                   "ray.partition=debug", "ray.time_min=10"] + [
    f"{k}.{v}" for k in ("train_aff", "train_seg")
    for v in ("launcher=slurm", "partition=debug", "gpus_per_node=0", "tasks_per_node=1",
              "cpus_per_task=1", "time_min=10", "epochs=1", "batch_size=4", "crop_size=48",
              "resize_long=[40,56]", "num_workers=0", "log_every=2")]


def sacct_rows(ids):
    cols = "JobID,State,Start,End,ElapsedRaw,NodeList"
    r = subprocess.run(["sacct", "-n", "-X", "-P", "-o", cols, "-j", ",".join(ids)],
                       capture_output=True, text=True, check=True)
    rows = {line.split("|")[0]: line.split("|")[1:] for line in r.stdout.splitlines() if line}
    return [rows.get(i, ["?"] * 5) for i in ids]


def log_tails(out: Path, lines: int = 15) -> str:
    """The end of every task log of the chain recorded under ``out``: what a failed assertion on
    a job's state shows, so that a job stuck or failing on another machine says where."""
    rec = json.loads((out / "stages" / "submitted.json").read_text())
    tails = []
    for j in rec["jobs"]:
        for log in sorted(Path(j["folder"]).glob("*_log.*")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            tails.append(f"--- {j['step']} {log.name}\n" + "\n".join(text))
    return "\n".join(tails) or "no job logs"


@pytest.fixture
def own_ray_token(monkeypatch):
    # submit_chain puts the chain's Ray token in this process's environment: not for later tests
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(k, raising=False)


def test_submitted_chain_runs_every_stage_to_the_report(slurm, cfg_path, tmp_path, own_ray_token):
    out = tmp_path / "chain"
    cfg = load_config(cfg_path, [f"out_dir={out}", *CHAIN_OVERRIDES])
    t0 = time.monotonic()
    jobs = submit_chain(cfg, str(cfg_path))
    assert len(jobs) == 7
    jobs[-1].result()                      # the eval-report job; raises if it did not complete
    print(f"chain of 7 jobs: {time.monotonic() - t0:.0f} s from submission to the report")
    rec = json.loads((out / "stages" / "submitted.json").read_text())
    ids = [j["job_id"] for j in rec["jobs"]]
    assert ids == [j.job_id for j in jobs]
    assert [j["step"] for j in rec["jobs"]] == ["train-cls", "cams", "aff-labels", "train-aff",
                                                "random-walk", "train-seg", "eval-report"]
    assert [j["dependency"] for j in rec["jobs"]] == [None] + [f"afterok:{i}" for i in ids[:-1]]
    deadline = time.monotonic() + 120   # the result exists before the last job has ended
    while time.monotonic() < deadline:
        rows = sacct_rows(ids)
        if all(r[0] not in ("RUNNING", "COMPLETING", "PENDING") for r in rows):
            break
        time.sleep(1)
    assert [r[0] for r in rows] == ["COMPLETED"] * 7, rows
    for prev, nxt in zip(rows, rows[1:]):  # each job started once the one before it had ended
        assert nxt[1] >= prev[2], rows
    assert all((out / "stages" / f"{s}.json").is_file()
               for s in table.stages_of(load_config(cfg_path)))
    assert json.loads((out / "stages" / "train_cls.json").read_text())["world_size"] == 2
    assert json.loads((out / "stages" / "cams.json").read_text())["shards_done"] == 8
    assert len(list((out / "random_walk").glob("*.tar"))) == 8
    assert {"cam", "rw", "seg"} <= set(json.loads((out / "report.json").read_text())["miou"])
    assert (out / "report.md").is_file()
    assert submit_chain(cfg, str(cfg_path)) == []      # all done: the same command submits nothing


def test_failing_step_leaves_the_later_ones_never_run(slurm, cfg_path, tmp_path, own_ray_token):
    from psa_dist.cluster.slurm_chain import ChainError
    # a file that exists but holds no weights: train-cls fails inside its job, not at submission
    # submit_retries=0: the chain stops at the first failure (retries: the tests below)
    broken = [*CHAIN_OVERRIDES, f"model.pretrained={cfg_path}", "submit_retries=0"]
    cfg = load_config(cfg_path, [f"out_dir={tmp_path / 'cancelled'}", *broken])
    jobs = submit_chain(cfg, str(cfg_path))
    ids = [j.job_id for j in jobs]
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        rows = sacct_rows(ids)
        if rows[0][0] == "FAILED" and all(r[0] == "CANCELLED" for r in rows[1:]):
            break
        time.sleep(1)
    assert rows[0][0] == "FAILED" and all(r[0] == "CANCELLED" for r in rows[1:]), \
        (rows, log_tails(tmp_path / "cancelled"))
    # never started: no node, no run time (sacct's Start is no proof: depending on how slurmctld
    # came to cancel a pending job, it reads "None" or the moment of cancelling)
    assert all(r[3] == "0" and r[4] == "None assigned" for r in rows[1:]), rows
    marks = {p.name for p in (tmp_path / "cancelled" / "stages").glob("*.json")}
    assert marks == {"submitted.json"}, f"a stage left its marker: {marks}"
    for j in json.loads((tmp_path / "cancelled" / "stages" / "submitted.json").read_text())["jobs"][1:]:
        assert not list(Path(j["folder"]).glob("*_log.*")), j         # no job output at all
    # --keep-blocked: the later jobs stay pending, DependencyNeverSatisfied; resubmitting refuses
    cfg = load_config(cfg_path, [f"out_dir={tmp_path / 'blocked'}", *broken])
    ids = [j.job_id for j in submit_chain(cfg, str(cfg_path), keep_blocked=True)]
    deadline = time.monotonic() + 240
    reason = ""
    while time.monotonic() < deadline and reason != "DependencyNeverSatisfied":
        reason = subprocess.run(["squeue", "-h", "-j", ids[1], "-o", "%r"], capture_output=True,
                                text=True).stdout.strip()
        time.sleep(1)
    try:
        assert reason == "DependencyNeverSatisfied"
        assert sacct_rows(ids)[0][0] == "FAILED"
        assert all(r[0] == "PENDING" for r in sacct_rows(ids[1:])), sacct_rows(ids)
        with pytest.raises(ChainError, match="still queued"):
            submit_chain(cfg, str(cfg_path))
    finally:
        subprocess.run(["scancel", *ids[1:]], check=False)


# ----------------------------------------------------------------------------- retries of a step
# A step that fails is requeued (same job id) up to `retries` times; the chain's steps here are
# shell commands (cluster/slurm_chain.py is generic over what a step runs).
def release_requeued(job_id: str, ran, timeout: float = 240) -> None:
    """Wait until ``job_id`` is requeued and held (BeginTime) once ``ran()`` (its attempt has
    run: a job just released stays PENDING a moment), then release it as an operator would:
    SLURM's hold of a requeued job (~2 minutes) is its own, not what is tested here."""
    deadline = time.monotonic() + timeout
    st = []
    while time.monotonic() < deadline:
        if not ran():
            time.sleep(0.2)
            continue
        st = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], text=True,
                            capture_output=True).stdout.split()
        if st[:2] == ["PENDING", "BeginTime"]:
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
            return
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} was not requeued within {timeout:.0f} s: {st}")


def shell_chain(tmp_path, flaky_script: str, retries: int):
    from submitit.helpers import CommandFunction

    from psa_dist.cluster import slurm_chain
    from psa_dist.config import JobConfig
    shape = JobConfig(launcher="slurm", partition="debug", gpus_per_node=0, tasks_per_node=1,
                      cpus_per_task=1, time_min=5)
    runs, after = tmp_path / "runs.txt", tmp_path / "after.txt"
    steps = [slurm_chain.Step("flaky", ["flaky"], shape, lambda where: CommandFunction(
                 ["bash", "-c", f"echo run >> {runs}; {flaky_script}"])),
             slurm_chain.Step("after", ["after"], shape, lambda where: CommandFunction(
                 ["bash", "-c", f"echo ran > {after}"]))]
    record = tmp_path / "submitted.json"
    jobs = slurm_chain.submit(steps, "retrytest", tmp_path / "submitit", record, meta={},
                              retries=retries)
    return jobs, runs, after, json.loads(record.read_text())["jobs"]


def wait_ended(ids, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = sacct_rows(ids)
        if all(r[0] not in ("RUNNING", "COMPLETING", "PENDING", "REQUEUED", "?") for r in rows):
            return rows
        time.sleep(1)
    return sacct_rows(ids)


def test_a_step_that_fails_once_is_requeued_and_the_chain_goes_on(slurm, tmp_path):
    marker = tmp_path / "failed-once"
    jobs, runs, after, rec = shell_chain(
        tmp_path, f"test -e {marker} || {{ touch {marker}; echo flaky >&2; exit 3; }}", retries=1)
    release_requeued(jobs[0].job_id, lambda: runs.is_file())
    jobs[-1].result()
    ids = [j.job_id for j in jobs]
    assert [r[0] for r in wait_ended(ids)] == ["COMPLETED", "COMPLETED"]
    assert [j["job_id"] for j in rec] == ids          # the same job ids, nothing resubmitted anew
    assert runs.read_text().splitlines() == ["run", "run"] and after.read_text() == "ran\n"
    fails = sorted(Path(rec[0]["folder"]).glob(f"{ids[0]}.failed-attempt-*"))
    assert [p.name for p in fails] == [f"{ids[0]}.failed-attempt-0"]
    text = fails[0].read_text()               # the attempt's error, for whoever looks later
    assert "FailedJobError" in text and "flaky" in text, text
    # sacct keeps the requeued attempt too (-D): one REQUEUED, then COMPLETED
    r = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-o", "State", "-j", ids[0]],
                       capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["REQUEUED", "COMPLETED"], r.stdout


def test_a_step_that_always_fails_stops_the_chain_after_its_retries(slurm, tmp_path):
    jobs, runs, after, rec = shell_chain(tmp_path, "exit 4", retries=2)
    for n in (1, 2):
        release_requeued(jobs[0].job_id, lambda: runs.is_file() and
                         len(runs.read_text().splitlines()) >= n)
    ids = [j.job_id for j in jobs]
    rows = wait_ended(ids)
    assert [r[0] for r in rows] == ["FAILED", "CANCELLED"], rows
    assert runs.read_text().splitlines() == ["run"] * 3          # 1 attempt + 2 retries
    assert not after.exists() and rows[1][4] == "None assigned"  # the next step never ran
    assert len(list(Path(rec[0]["folder"]).glob(f"{ids[0]}.failed-attempt-*"))) == 3
