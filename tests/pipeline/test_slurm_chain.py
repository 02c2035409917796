"""`psa-dist submit`'s chain of dependent jobs on a real SLURM cluster (``tests/pipeline/
conftest.py``): run to the report; a chain whose first job fails leaving the later ones never
run; a failed step requeued under the same job id, once and then through, or until its retries
are spent."""
import json
import subprocess
import time
from pathlib import Path

import pytest

from psa_dist.config import load_config
from psa_dist.stages import table
from psa_dist.submit import submit_chain


pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


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
