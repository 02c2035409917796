"""`psa-dist bench scale`: COCO's count end to end through the label stages on a Ray cluster of
several nodes on this machine, and what the measured scheduling gives at 8 / 32 / 128 GPUs.

What it does, each step a `psa-dist` command of its own (the driver a user would run), echoed:

1. The synthetic dataset with COCO's numbers (``--images`` 82,783 train images, ``--classes`` 80)
   at a tiny ``--image-size`` in shards of ``--shard-size`` (100, as docs/coco.md converts COCO:
   828 shards), written by the multiprocess writer, or reused where it is already there.
2. The classifier and AffinityNet trained briefly on its first ``--train-images`` images (the
   generator is a function of (seed, split, index): a dataset of that count holds exactly them),
   one epoch each (``--train-images / batch`` steps), in this machine's process; that run's own
   CAMs and affinity labels (in process) are what AffinityNet learns from. Reused when done.
3. A ``ray.cluster_utils.Cluster``: a head with no CPU (its GCS, no actors) and ``--nodes`` nodes
   of ``--cpus-per-node`` CPUs; the big run's ``train_cls`` / ``train_aff`` are those checkpoints.
4. ``psa-dist cams``, ``aff-labels``, ``random-walk`` (``--ray-address``, from scratch) and
   ``psa-dist export --what pseudo``, while a thread samples the driver's and the GCS server's
   memory, and when each shard's line reaches ``stages/<stage>.shards.jsonl``.

Per label stage: shards/s and images/s; the worker's own seconds per shard (median, longest); the
stage's wall time against the sum of its shards' work over the actors; the scheduling overhead per
shard, both as ``(wall x actors - work) / shards`` (everything that is not a worker working: actor
start-up, the idle tail, dispatch) and with the start-up and the tail taken out (dispatch and
bookkeeping only); the driver's peak RSS; the GCS server's RSS over the stage; the bytes the
object store created, and the bytes of the task arguments and returns (small: they travel inline,
not through the plasma store). Then the projection of the label stages to COCO on 8 / 32 / 128
GPUs from those figures (``scale_figures.project``). Writes ``OUT/scale.json`` and ``OUT/scale.md``.

Timings on a shared 2-core machine are noisy; the figures that the projection needs (overhead per
shard, longest / median shard) are ratios and differences within one run.
"""
from __future__ import annotations

import copy
import hashlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from ..config import Config, load_config
from ..data.shards import iter_shard, read_dataset_json, split_shards
from ..stages.run_dir import Run, RunDir, ensure_dataset
from ..util.atomic import atomic_write_bytes, atomic_write_json
from .cases import COCO_SHARD_SIZE
from .scale_figures import COCO_TRAIN, format_table, inline_bytes, project, stage_figures

LABEL_STAGES = ("cams", "aff_labels", "random_walk")
# The bench's settings over the config (the demo's by default): COCO's count and classes at a tiny
# size, one epoch of each trainer in this process, no curves. {placeholders} are filled in.
SCALE_OVERRIDES = [
    "name=scale", "out_dir={out}/run", "data.root={out}/data", "data.source=synth",
    "data.shard_size={shard_size}", "data.workers=2",
    "synth.num_train={images}", "synth.num_val=8", "synth.num_classes={classes}",
    "synth.image_size={image_size}",
    "train_cls.launcher=inline", "train_aff.launcher=inline",
    "train_cls.epochs=1", "train_aff.epochs=1", "train_cls.fit_target=null",
    "train_cls.fit_each_class=false", "train_cls.stop_patience=null", "train_aff.stop_patience=null",
    "train_cls.tensorboard=false", "train_aff.tensorboard=false",
    "train_cls.crop_size={image_size}", "train_aff.crop_size={aff_crop}",
    "train_cls.resize_long=null", "train_aff.resize_long=null",
    "train_cls.log_every=50", "train_aff.log_every=50",
    "aff_labels.crf_bi_sxy={sxy}",
    # The per-image work cut to what the count needs on a shared 2-core CPU: CAMs at one scale, no
    # flip, no dense CRF (with the demo's 4 scales + flip and the CRF, 82,783 images take hours
    # here). What is measured is the scheduling of 828 shards; the work of a real COCO image is
    # `bench cost`'s, and the projection takes it from there.
    "cams.scales=[1.0]", "cams.flip=false", "aff_labels.crf=false", "random_walk.crf=false",
]


def _rss_kb(pid: int, field: str = "VmRSS") -> int | None:
    """A process's resident memory in KB (``VmHWM``: its peak), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def scale_config(config, overrides, out: Path, images: int, classes: int, image_size: int,
                 shard_size: int) -> Config:
    """The big run's config: ``config`` (or the demo's) with :data:`SCALE_OVERRIDES`, then the
    caller's ``overrides``."""
    aff_stride = load_config(config, list(overrides)).model.aff_stride
    fill = {"out": str(out), "images": images, "classes": classes, "image_size": image_size,
            "shard_size": shard_size, "aff_crop": image_size // aff_stride * aff_stride,
            "sxy": max(1, round(30 * image_size / 128))}      # the demo's 30 at 128 px
    ours = [o.format(**fill) for o in SCALE_OVERRIDES]
    return load_config(config, ours + list(overrides))


def _write_config(cfg: Config, path: Path) -> Path:
    tree = json.loads(json.dumps(dataclasses.asdict(cfg)))      # tuples as lists
    atomic_write_bytes(path, yaml.safe_dump(tree, sort_keys=False).encode())
    return path


class _Sampler(threading.Thread):
    """Samples, every ``interval`` s, the driver's and the GCS server's RSS, and the arrival time
    of every new line of a shard log."""

    def __init__(self, driver_pid: int, gcs_pid: int | None, shard_log: Path | None,
                 interval: float = 0.2):
        super().__init__(daemon=True)
        self.driver_pid, self.gcs_pid, self.shard_log = driver_pid, gcs_pid, shard_log
        self.interval, self.stop = interval, threading.Event()
        self.driver_kb, self.driver_hwm_kb, self.gcs_kb = [], 0, []
        self.arrivals: list[tuple[float, dict]] = []     # (monotonic time seen, the log line)
        self._offset = 0

    def _read_log(self) -> None:
        if self.shard_log is None or not self.shard_log.is_file():
            return
        with open(self.shard_log) as f:
            f.seek(self._offset)
            data = f.read()
        complete = data[:data.rfind("\n") + 1]
        self._offset += len(complete.encode())
        now = time.monotonic()
        for line in complete.splitlines():
            if line.strip():
                self.arrivals.append((now, json.loads(line)))

    def sample(self) -> None:
        rss = _rss_kb(self.driver_pid)
        if rss is not None:
            self.driver_kb.append(rss)
            self.driver_hwm_kb = max(self.driver_hwm_kb, _rss_kb(self.driver_pid, "VmHWM") or 0)
        if self.gcs_pid:
            g = _rss_kb(self.gcs_pid)
            if g is not None:
                self.gcs_kb.append(g)
        self._read_log()

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval)
        self.sample()


def _psa(args: list, log: Path, gcs_pid=None, shard_log=None) -> dict:
    """``python -m psa_dist.cli ARGS`` with its output echoed and kept in ``log``, sampled; its
    wall time, exit code, memory, the time it said ``[run] ...: N train images`` (the stage starts
    right after) and the shard log's arrivals."""
    cmd = [sys.executable, "-m", "psa_dist.cli", *map(str, args)]
    print(f"[bench scale] $ psa-dist {' '.join(map(str, args))}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    sampler = _Sampler(proc.pid, gcs_pid, shard_log)
    sampler.start()
    stage_start = None
    with open(log, "w") as keep:
        for line in proc.stdout:
            if stage_start is None and line.startswith("[run] ") and " train images, " in line:
                stage_start = time.monotonic()
            sys.stdout.write(line)
            sys.stdout.flush()
            keep.write(line)
    # wait4: the child's own peak RSS, which /proc no longer shows once it has exited
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - t0
    sampler.stop.set()
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"psa-dist {' '.join(map(str, args))} exited with "
                           f"{proc.returncode}; its output is in {log}")
    return {"wall": wall, "t0": t0, "stage_start": stage_start, "sampler": sampler,
            "driver_peak_mb": round(max(usage.ru_maxrss, sampler.driver_hwm_kb) / 1024, 1)}


def _object_store(cluster) -> dict | None:
    """The cluster's object store counters (cumulative bytes and objects created, bytes in use),
    from the raylets' store stats (Ray's ``ray memory --stats-only``); None where this Ray has
    no such call."""
    try:
        from ray._private.internal_api import get_memory_info_reply
        s = get_memory_info_reply(cluster.global_state).store_stats
        return {"created_bytes": int(s.cumulative_created_bytes),
                "created_objects": int(s.cumulative_created_objects),
                "used_bytes": int(s.object_store_bytes_used),
                "spilled_bytes": int(s.spilled_bytes_total)}
    except Exception as e:  # noqa: BLE001 - a private API: its absence loses one figure, not the run
        print(f"[bench scale] object store stats unavailable: {type(e).__name__}: {e}", flush=True)
        return None


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _train(cfg: Config, out: Path, train_images: int) -> dict:
    """Classifier and AffinityNet, one epoch each on the first ``train_images`` images, in this
    machine's processes (label stages in process). Reused when done on the same data."""
    tcfg = copy.deepcopy(cfg)
    tcfg.synth.num_train = train_images
    tcfg.data.root, tcfg.out_dir = str(out / "train_data"), str(out / "train")
    tcfg.ray.enabled = False
    t0 = time.monotonic()
    ensure_dataset(tcfg)
    mark = RunDir(tcfg.out_dir).dataset_mark
    if mark.is_file() and mark.read_text().strip() != _sha(Path(tcfg.data.root) / "dataset.json"):
        shutil.rmtree(tcfg.out_dir)     # trained on other data: train again
    path = _write_config(tcfg, out / "train.yaml")
    steps = {}
    for stage in ("train_cls", "cams", "aff_labels", "train_aff"):
        r = _psa([stage.replace("_", "-"), path], out / "logs" / f"train.{stage}.log")
        steps[stage] = {"wall_s": round(r["wall"], 1), "driver_peak_mb": r["driver_peak_mb"]}
    run = Run(tcfg, prepare=False)
    for stage in ("train_cls", "train_aff"):
        s = run.summary(stage)
        steps[stage].update({k: s[k] for k in ("steps", "epochs", "final_loss") if k in s})
    return {"images": train_images, "seconds": round(time.monotonic() - t0, 1), "steps": steps,
            "run": str(run.out)}


def _link_models(cfg: Config, train_run: Path) -> None:
    """The big run's trainers are the training run's checkpoints (linked, marked done)."""
    run = Run(cfg, prepare=False)
    for stage, model in (("train_cls", "cls"), ("train_aff", "aff")):
        dst = run.checkpoint(model)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.unlink(missing_ok=True)
        try:
            os.link(RunDir(train_run).checkpoint(model), dst)
        except OSError:
            shutil.copyfile(RunDir(train_run).checkpoint(model), dst)
        run.finish(stage, {"seconds": 0.0, "models_from": str(train_run)})


def check_export(export_dir: Path, dataset_root: Path, split: str = "train") -> dict:
    """Every key of the split exported once: the image list, the label files and the dataset's
    keys (from its shards' samples) agree."""
    listed = (export_dir / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
    labels = sorted(p.stem for p in (export_dir / "SegmentationClassAug").glob("*.png"))
    keys = [raw["__key__"] for s in split_shards(dataset_root, split) for raw in iter_shard(s)]
    return {"listed": len(listed), "listed_unique": len(set(listed)), "label_files": len(labels),
            "dataset_keys": len(keys),
            "every_key_once": sorted(listed) == sorted(keys) == labels}


def _measure_stage(stage: str, cfg: Config, path: Path, out: Path, cluster, gcs: int,
                   gcs_all: list) -> dict:
    """One label stage from scratch on ``cluster`` as its own ``psa-dist`` command, sampled;
    its figures (``gcs_all`` gets the GCS server's RSS samples)."""
    shard_log = RunDir(cfg.out_dir).shard_log(stage)
    store0 = _object_store(cluster)
    r = _psa([stage.replace("_", "-"), path, "--force", "--ray-address", cluster.address],
             out / "logs" / f"{stage}.log", gcs_pid=gcs, shard_log=shard_log)
    store1 = _object_store(cluster)
    marker = json.loads(RunDir(cfg.out_dir).marker(stage).read_text())
    lines = [json.loads(x) for x in shard_log.read_text().splitlines() if x.strip()]
    s = r["sampler"]
    fig = stage_figures(stage, lines, s.arrivals, marker["seconds"],
                        int(marker.get("actors") or len({x.get("pid") for x in lines})),
                        r["stage_start"])
    gcs_all += s.gcs_kb
    fig.update({
        "command_wall_s": round(r["wall"], 2), "driver_peak_mb": r["driver_peak_mb"],
        "gcs_rss_mb": [round(min(s.gcs_kb) / 1024, 1), round(max(s.gcs_kb) / 1024, 1)]
        if s.gcs_kb else None,
        "gcs_rss_mb_end": round(s.gcs_kb[-1] / 1024, 1) if s.gcs_kb else None,
        "inline_bytes": inline_bytes(lines),
        "store_created_bytes": (store1["created_bytes"] - store0["created_bytes"])
        if store0 and store1 else None,
        "store_created_objects": (store1["created_objects"] - store0["created_objects"])
        if store0 and store1 else None,
        "restarts": marker.get("restarts"), "failed_samples": len(marker.get("failed", [])),
        "failed_shards": len(marker.get("failed_shards", []))})
    print(f"[bench scale] {stage}: {fig['shards']} shards, {fig['images']} images in "
          f"{fig['wall_s']} s: {fig['shards_per_s']} shards/s, {fig['images_per_s']} img/s "
          f"on {fig['actors']} actors; overhead {fig['overhead_ms_per_shard']} ms/shard "
          f"({fig.get('overhead_steady_ms_per_shard')} without start-up and tail); "
          f"longest shard {fig['longest_over_median']}x the median", flush=True)
    return fig


def bench_scale(out, config=None, overrides=(), images: int = COCO_TRAIN, classes: int = 80,
                image_size: int = 32, shard_size: int = COCO_SHARD_SIZE, nodes: int = 2,
                cpus_per_node: int = 1, train_images: int = 2000,
                object_store_mb: int = 150, export_workers: int = 2) -> dict:
    """The whole benchmark (module docstring); returns what ``OUT/scale.json`` holds."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    out = Path(out).resolve()
    config = config or "configs/demo.yaml"
    cfg = scale_config(config, overrides, out, images, classes, image_size, shard_size)
    res = {"bench": "scale", "images": images, "classes": classes, "image_size": image_size,
           "shard_size": shard_size, "nodes": nodes, "cpus_per_node": cpus_per_node,
           "cpus": os.cpu_count(), "ray": ray.__version__, "config": str(config),
           "overrides": list(overrides)}
    t0 = time.monotonic()
    ds_json = Path(cfg.data.root) / "dataset.json"
    before = _sha(ds_json) if ds_json.is_file() else None
    ensure_dataset(cfg)          # reused when there with these settings, else written
    info = read_dataset_json(cfg.data.root)
    res["dataset"] = {"root": cfg.data.root, "seconds": round(time.monotonic() - t0, 1),
                      "reused": before == _sha(ds_json),
                      "train_shards": len(info["splits"]["train"]["shards"]),
                      "train_images": info["splits"]["train"]["count"]}
    print(f"[bench scale] dataset: {res['dataset']['train_images']} train images in "
          f"{res['dataset']['train_shards']} shards ({res['dataset']['seconds']} s)", flush=True)
    res["training"] = _train(cfg, out, min(train_images, images))
    shutil.rmtree(cfg.out_dir, ignore_errors=True)      # the big run: label stages measured anew
    path = _write_config(cfg, out / "scale.yaml")
    _link_models(cfg, Path(res["training"]["run"]))

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": object_store_mb << 20})
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=cpus_per_node, object_store_memory=object_store_mb << 20)
        cluster.wait_for_nodes()
        gcs = cluster.head_node.all_processes["gcs_server"][0].process.pid
        res["gcs_rss_mb_start"] = round((_rss_kb(gcs) or 0) / 1024, 1)
        gcs_all = []
        res["stages"] = [_measure_stage(stage, cfg, path, out, cluster, gcs, gcs_all)
                         for stage in LABEL_STAGES]
        res["gcs_rss_mb_max"] = round(max(gcs_all) / 1024, 1) if gcs_all else None
        res["gcs_rss_mb_end"] = round((_rss_kb(gcs) or 0) / 1024, 1)
        res["gcs_peak_mb"] = round((_rss_kb(gcs, "VmHWM") or 0) / 1024, 1)
    finally:
        cluster.shutdown()
    exp = out / "export"
    r = _psa(["export", path, "--what", "pseudo", "--out", exp, "--overwrite",
              "--workers", export_workers], out / "logs" / "export.log")
    summary = json.loads((exp / "export.json").read_text())
    res["export"] = {"wall_s": round(r["wall"], 1), "seconds": summary["seconds"],
                     "images": summary["images"], "failed": len(summary["failed"]),
                     "images_per_s": round(summary["images"] / max(summary["seconds"], 1e-9), 1),
                     "driver_peak_mb": r["driver_peak_mb"],
                     **check_export(exp, Path(cfg.data.root))}
    res["seconds"] = round(time.monotonic() - t0, 1)
    res["projection"] = project(res["stages"], speculate_after=cfg.ray.speculate_after,
                                speculate_min_s=cfg.ray.speculate_min_s)
    atomic_write_json(out / "scale.json", res)
    md = format_table(res)
    atomic_write_bytes(out / "scale.md", md.encode())
    print(md, flush=True)
    return res
