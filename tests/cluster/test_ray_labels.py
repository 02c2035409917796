"""Label generation on real Ray clusters: equal results for any number of actors, resume, a worker
killed mid-run, a node removed mid-run, undecodable samples, and GPU scheduling; and the same
scheduler in this process (``ray.enabled=false``) with the same accounting."""
import hashlib
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from psa_dist.config import load_config
from psa_dist.cluster.shard_pool import StageFailed
from psa_dist.pipeline import run_pipeline
from psa_dist.stages.label_pool import label_pool
from psa_dist.stages.run_dir import Run
from psa_dist.data.shards import iter_shard, write_shard

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# the tiny config (``tiny_config``)
TINY = dict(name="raytest", shard_size=3, num_train=18, num_val=3,
            trainers=("train_cls", "train_aff"), cams={"scales": [1.0, 0.5], "batch_size": 2},
            aff_labels={"crf": False}, random_walk={"t": 64}, model={"aff_dims": [8, 8, 8, 16]},
            ray={"enabled": False})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, trained_run):
    """A run directory with a trained classifier and AffinityNet (serial, no Ray)."""
    base = tmp_path_factory.mktemp("raylabels")
    p, _ = trained_run(base, ["train_cls", "cams", "aff_labels", "train_aff"], **TINY)
    return base, p


@pytest.fixture
def ray_local(local_ray):
    with local_ray(num_cpus=4) as ray:
        yield ray


def clone_run(base, name, stages_to_copy=("cls", "aff", "cams", "aff_labels")):
    """A fresh run directory holding the trained models (and earlier stage outputs)."""
    out = base / name
    markers = {"cls": "train_cls", "aff": "train_aff", "cams": "cams", "aff_labels": "aff_labels"}
    for d in stages_to_copy:
        shutil.copytree(base / "ref" / d, out / d)
        (out / "stages").mkdir(parents=True, exist_ok=True)
        shutil.copy(base / "ref" / "stages" / f"{markers[d]}.json", out / "stages")
    return out


def digests(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(directory).glob("*.tar"))}


def job_for(base, cfg_path, out, stage, actors, **over):
    """The stage's pool (Ray unless ray.enabled=false is passed), its tasks and sample counts."""
    cfg = load_config(cfg_path, [f"out_dir={out}", "ray.enabled=true"] +
                      [f"{k}={v}" for k, v in over.items()])
    run = Run(cfg)
    counts = {str(run.root / s["name"]): s["count"] for s in run.info["splits"]["train"]["shards"]}
    tasks = list(zip(run.train_shards, run.label_shards(stage)))
    return label_pool(run, stage, actors), tasks, counts


def test_same_outputs_for_1_2_4_actors_and_resume(trained, ray_local):
    base, cfg_path = trained
    results = {}
    for stage, d in (("cams", "cams"), ("random_walk", "random_walk")):
        for n in (1, 2, 4):
            out = clone_run(base, f"{stage}{n}", ("cls", "aff", "cams") if stage != "cams" else ("cls",))
            job, shards, counts = job_for(base, cfg_path, out, stage, n)
            assert job.num_actors == n
            summary = job.run(shards, counts)
            assert summary["done"] == 18 and summary["failed"] == [] and summary["shards_done"] == 6
            results[(stage, n)] = digests(out / d)
        assert len(results[(stage, 1)]) == 6
        assert results[(stage, 1)] == results[(stage, 2)] == results[(stage, 4)]
    # per-shard JSON log: one line per shard with timing
    lines = (base / "random_walk4" / "stages" / "random_walk.shards.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(x)["seconds"] >= 0 for x in lines)
    for x in map(json.loads, lines):   # I/O wait is part of the shard's time, never more
        assert 0 <= x["read_wait_seconds"] + x["write_seconds"] <= x["seconds"] + 1e-3
    # resume: drop two outputs, leave a stale temp file; only the two are redone, same bytes
    out = base / "random_walk2"
    (out / "random_walk" / "train-000001.tar").unlink()
    (out / "random_walk" / "train-000004.tar").unlink()
    (out / "random_walk" / ".train-000004.tar.123.tmp").write_bytes(b"partial")
    keep = (out / "random_walk" / "train-000000.tar").stat().st_mtime_ns
    job, shards, counts = job_for(base, cfg_path, out, "random_walk", 2)
    summary = job.run(shards, counts)
    assert summary["shards_done"] == 2 and summary["shards_skipped"] == 4
    assert (out / "random_walk" / "train-000000.tar").stat().st_mtime_ns == keep
    assert digests(out / "random_walk") == results[("random_walk", 1)]


def _kill_first_worker(log_path, stop):
    while not stop.is_set():
        if log_path.is_file() and log_path.read_text().strip():
            pid = json.loads(log_path.read_text().splitlines()[0])["pid"]
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.05)


def test_worker_killed_mid_run(trained, ray_local):
    base, cfg_path = trained
    ref = clone_run(base, "killref", ("cls", "aff", "cams"))
    job, shards, counts = job_for(base, cfg_path, ref, "random_walk", 2)
    job.run(shards, counts)
    out = clone_run(base, "killed", ("cls", "aff", "cams"))
    job, shards, counts = job_for(base, cfg_path, out, "random_walk", 2)
    stop = threading.Event()
    killer = threading.Thread(target=_kill_first_worker,
                              args=(out / "stages" / "random_walk.shards.jsonl", stop))
    killer.start()
    summary = job.run(shards, counts)
    stop.set()
    killer.join()
    assert summary["restarts"] >= 1
    assert digests(out / "random_walk") == digests(ref / "random_walk")
    keys = [r["__key__"] for p in sorted((out / "random_walk").glob("*.tar")) for r in iter_shard(p)]
    assert len(keys) == 18 and len(set(keys)) == 18


def test_node_removed_mid_run(trained, ray_cluster):
    import ray
    base, cfg_path = trained
    with ray_cluster(workers=1) as cluster:
        (worker,) = cluster.worker_nodes
        ray.init(address=cluster.address, log_to_driver=False)
        out = clone_run(base, "noderm", ("cls", "aff", "cams"))
        job, shards, counts = job_for(base, cfg_path, out, "random_walk", 2)
        log = out / "stages" / "random_walk.shards.jsonl"

        done = threading.Event()

        def remove_when_started():
            while not (log.is_file() and log.read_text().strip()):
                if done.wait(0.05):       # the run ended first (it failed): nothing to remove
                    return
            cluster.remove_node(worker)
        t = threading.Thread(target=remove_when_started, daemon=True)
        t.start()
        try:
            summary = job.run(shards, counts)
        finally:
            done.set()
            t.join()
        keys = [r["__key__"] for p in sorted((out / "random_walk").glob("*.tar")) for r in iter_shard(p)]
        assert summary["shards_done"] == 6 and len(set(keys)) == 18
        assert summary["restarts"] >= 1      # the removed node's actor was lost and replaced
        nodes = {json.loads(x)["node"] for x in log.read_text().splitlines()}
        assert cluster.head_node.node_id in nodes


@pytest.mark.parametrize("on_ray", [True, False])
def test_undecodable_sample_recorded_and_threshold(trained, ray_local, on_ray):
    """One accounting whether the stage runs on Ray actors or in this process."""
    base, cfg_path = trained
    cfg = load_config(cfg_path)
    # a dataset copy whose shard 2 holds one corrupt image
    data = base / f"data_bad{on_ray}"
    shutil.copytree(cfg.data.root, data)
    samples = list(iter_shard(data / "train-000002.tar"))
    bad_key = samples[1]["__key__"]
    samples[1]["jpg"] = samples[1]["jpg"][:100]
    write_shard(data / "train-000002.tar", samples)
    out = clone_run(base, f"bad{on_ray}", ("cls",))
    over = {"data.root": data, "ray.enabled": str(on_ray).lower()}
    job, shards, counts = job_for(base, cfg_path, out, "cams", 2, **over, **{"ray.max_failures": 0.1})
    summary = job.run(shards, counts)
    assert summary["shards_done"] == 6 and summary["failed_shards"] == []
    assert [f["key"] for f in summary["failed"]] == [bad_key]
    assert "image" in summary["failed"][0]["reason"]
    assert len(list(iter_shard(out / "cams" / "train-000002.tar"))) == 2   # rest of the shard
    # with no tolerance the stage fails (after finishing every shard)
    lines = (out / "stages" / "cams.shards.jsonl").read_text().splitlines()
    assert len(lines) == 6                          # the per-shard log in both modes
    out2 = clone_run(base, f"bad2{on_ray}", ("cls",))
    job, shards, counts = job_for(base, cfg_path, out2, "cams", 2, **over, **{"ray.max_failures": 0.0})
    with pytest.raises(StageFailed, match=bad_key):
        job.run(shards, counts)
    assert len(digests(out2 / "cams")) == 6


def test_gpu_actors_are_scheduled_one_per_gpu(trained, local_ray):
    # Ray's GPUs here are logical (no CUDA): the model stages get one actor per GPU, each with its
    # own GPU id (the worker falls back to the CPU); affinity labels, CPU work, one per CPU.
    base, cfg_path = trained
    with local_ray(num_cpus=3, num_gpus=2):
        out = clone_run(base, "gpus", ("cls", "aff"))
        job, shards, counts = job_for(base, cfg_path, out, "cams", 0)
        assert job.gpus == 2 and job.num_actors == 2
        job.run(shards, counts)
        lines = [json.loads(x) for x in
                 (out / "stages" / "cams.shards.jsonl").read_text().splitlines()]
        gpus = {tuple(x["gpus"]) for x in lines}
        assert all(len(g) == 1 for g in gpus) and len({g[0] for g in gpus}) == 2
        assert {x["device"] for x in lines} == {"cpu"}    # a logical GPU: the worker used the CPU
        cpu_only, _, _ = job_for(base, cfg_path, out, "cams", 0, device="cpu")
        assert cpu_only.gpus == 0 and cpu_only.num_actors == 3    # device=cpu is honoured
        job, shards, counts = job_for(base, cfg_path, out, "aff_labels", 0)
        assert job.gpus == 0 and job.num_actors == 3
        job.run(shards, counts)
        lines = [json.loads(x) for x in
                 (out / "stages" / "aff_labels.shards.jsonl").read_text().splitlines()]
        assert all(x["gpus"] == [] for x in lines) and len({x["pid"] for x in lines}) >= 2


def test_pipeline_uses_ray_by_default(trained):
    base, cfg_path = trained
    out = clone_run(base, "viaray", ("cls", "aff"))
    cfg = load_config(cfg_path, [f"out_dir={out}", "ray.enabled=true", "ray.num_cpus=2"])
    import ray
    try:
        run_pipeline(cfg, stages=["cams", "aff_labels", "random_walk"])
        assert ray.is_initialized()
    finally:
        ray.shutdown()
    for stage, d in (("cams", "cams"), ("aff_labels", "aff_labels"), ("random_walk", "random_walk")):
        marker = json.loads((out / "stages" / f"{stage}.json").read_text())
        assert marker["shards_done"] == 6 and marker["actors"] == 2   # ran on two Ray actors
        keys = [r["__key__"] for p in sorted((out / d).glob("*.tar")) for r in iter_shard(p)]
        assert len(set(keys)) == 18
        # each actor's output is in the run directory, one file per actor, named in the shard log
        logs = sorted((out / "stages" / "logs").glob(f"{stage}-*.log"))
        assert len(logs) == 2 and all("started" in p.read_text() for p in logs)
        lines = (out / "stages" / f"{stage}.shards.jsonl").read_text().splitlines()
        assert {json.loads(x)["actor_log"] for x in lines} == {str(p) for p in logs}


def test_worker_that_cannot_start_fails_the_stage(trained, ray_local):
    """A worker whose constructor raises (here: a corrupt classifier checkpoint) fails the same way
    on every restart: the stage stops with that error instead of reporting success."""
    base, cfg_path = trained
    out = clone_run(base, "badckpt", ("cls",))
    (out / "cls" / "checkpoint.pth").write_bytes(b"not a checkpoint")
    for on_ray in ("true", "false"):
        job, shards, counts = job_for(base, cfg_path, out, "cams", 2, **{"ray.enabled": on_ray})
        with pytest.raises(StageFailed, match="failed to start"):
            job.run(shards, counts)
        assert not list((out / "cams").glob("*.tar"))
