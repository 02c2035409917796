"""Label generation on a Ray cluster: CAMs, affinity labels and random walk over many workers.

The work unit is an input shard. ``ShardedLabelJob`` keeps a pool of ``LabelWorker`` actors (one
per GPU with ``num_gpus=1``, or one per CPU where there is no GPU), each loading its model once and
streaming shards through the same per-shard functions the serial pipeline uses
(:mod:`psa_dist.labelgen`). Every actor runs with one intra-op thread on CPU, so the bytes written
do not depend on how many actors there are.

Reliability: output shards are written atomically, so a rerun skips every shard that exists. A task
lost with its actor (process killed, node removed) puts the shard back in the queue and a new actor
is started in the old one's place, on whatever nodes remain. A shard that fails for a reason of its
own (unreadable input) is recorded and the stage goes on; the stage fails only when failed samples
exceed ``ray.max_failures`` (a share of all samples).
"""
from __future__ import annotations

import json
import os
import time
from collections import deque
from pathlib import Path

from .engine import amp_dtype
from .labelgen import aff_label_shard, cam_shard, output_path, rw_shard
from .progress import Progress
from .shards import shard_basename

STAGE_DIRS = {"cams": "cams", "aff_labels": "aff_labels", "random_walk": "rw"}


class StageFailed(RuntimeError):
    """More failures than the configured threshold; the message says which shards and samples."""


class LabelWorker:
    """One label-generation worker: loads its stage's model once, then processes shards."""

    def __init__(self, stage: str, cfg, out_dir: str, num_classes: int, threads: int = 1):
        import torch
        torch.set_num_threads(threads)
        self.stage, self.cfg, self.out, self.num_classes = stage, cfg, Path(out_dir), num_classes
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = None
        if stage in ("cams", "random_walk"):
            from .pipeline import load_weights
            if stage == "cams":
                from .models import build_classifier
                net = build_classifier(cfg.model, num_classes)
                path = self.out / "cls" / "checkpoint.pth"
            else:
                from .backbones import build_backbone
                from .models import AffinityNet
                net = AffinityNet(build_backbone(cfg.model.backbone), cfg.model.aff_dims,
                                  cfg.model.aff_stride)
                path = self.out / "aff" / "checkpoint.pth"
            self.model = load_weights(net, path).to(self.device).eval()

    def pid(self) -> int:
        return os.getpid()

    def process(self, in_shard: str, out_shard: str) -> dict:
        cfg, stage = self.cfg, self.stage
        cams_in = output_path(self.out / "cams", in_shard)
        if stage == "cams":
            c = cfg.cams
            res = cam_shard(self.model, in_shard, out_shard, self.num_classes, tuple(c.scales), c.flip,
                            self.device, c.batch_size, amp_dtype(c.amp, self.device, "cams.amp"))
        elif stage == "aff_labels":
            res = aff_label_shard(in_shard, cams_in, out_shard, cfg.aff_labels.alpha_lo,
                                  cfg.aff_labels.alpha_hi, crf_settings(cfg, cfg.aff_labels.crf))
        else:
            r = cfg.random_walk
            res = rw_shard(self.model, in_shard, cams_in, out_shard, r.beta, r.t, r.radius, r.bg_alpha,
                           self.device, r.batch_size, r.tol, crf_settings(cfg, r.crf))
        res["pid"] = os.getpid()
        import ray
        if ray.is_initialized():
            res["node"] = ray.get_runtime_context().get_node_id()
            res["gpus"] = [str(g) for g in ray.get_gpu_ids()]
        return res


def crf_settings(cfg, enabled: bool) -> dict | None:
    """The dense CRF's settings (``aff_labels.crf_*``, shared by both stages that use it), or None
    when that stage does not."""
    a = cfg.aff_labels
    if not enabled:
        return None
    return {"iters": a.crf_iters, "gauss_sxy": a.crf_gauss_sxy, "gauss_compat": a.crf_gauss_compat,
            "bi_sxy": a.crf_bi_sxy, "bi_srgb": a.crf_bi_srgb, "bi_compat": a.crf_bi_compat}


def ensure_ray(ray_cfg, num_cpus: int | None = None):
    """Connect to ``ray.address`` or start a local instance (dashboard off unless ``ray.dashboard``;
    bound to ``ray.dashboard_host``, 127.0.0.1 by default)."""
    import ray
    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray_cfg.address:
        ray.init(address=ray_cfg.address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=ray_cfg.dashboard,
                 dashboard_host=ray_cfg.dashboard_host, log_to_driver=False)
    return ray


class ShardedLabelJob:
    """Runs one label stage over shards on a pool of Ray actors, retrying lost shards."""

    def __init__(self, stage: str, cfg, out_dir, num_classes: int, num_actors: int = 0,
                 max_retries: int = 3, log_path=None, start_timeout: float = 600.0):
        import ray
        if stage not in STAGE_DIRS:
            raise ValueError(f"unknown label stage {stage!r} (have {sorted(STAGE_DIRS)})")
        self.ray, self.stage, self.cfg = ray, stage, cfg
        self.out, self.num_classes, self.max_retries = Path(out_dir), num_classes, max_retries
        self.start_timeout = start_timeout
        res = ray.cluster_resources()
        # Affinity labels are CAM thresholds and the dense CRF, CPU work without a model: one actor
        # per CPU even where there are GPUs (an actor per GPU would leave most cores idle).
        self.gpus = 0 if stage == "aff_labels" else int(res.get("GPU", 0))
        slots = self.gpus or max(1, int(res.get("CPU", 1)))
        # More actors than the cluster can place would sit pending with tasks queued on them.
        self.num_actors = min(num_actors or slots, slots)
        if num_actors > slots:
            print(f"[{stage}] {num_actors} actors asked for, the cluster has room for {slots}",
                  flush=True)
        self.log_path = Path(log_path) if log_path else self.out / "stages" / f"{stage}.shards.jsonl"
        self.actor_cls = ray.remote(LabelWorker).options(
            num_cpus=1, num_gpus=1 if self.gpus else 0, max_concurrency=1)

    def _raise_if_init_failed(self, e: Exception) -> None:
        # A worker whose constructor raised (bad checkpoint, missing file) fails the same way on
        # every retry: stop with its error instead of restarting it.
        if getattr(e, "actor_init_failed", False):
            raise StageFailed(f"{self.stage}: a worker failed to start: {e}") from e

    def _new_actor(self):
        return self.actor_cls.remote(self.stage, self.cfg, str(self.out), self.num_classes)

    def run(self, shards: list, counts: dict | None = None) -> dict:
        """Process ``shards`` (paths); ``counts`` maps a shard path to its number of samples."""
        counts = {str(k): v for k, v in (counts or {}).items()}
        total_samples = sum(counts.values()) or None
        from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError
        ray = self.ray
        out_dir = self.out / STAGE_DIRS[self.stage]
        todo = deque(str(s) for s in shards if not output_path(out_dir, s).is_file())
        skipped = len(shards) - len(todo)
        bar = Progress(self.stage.replace("_", "-"),
                       total=sum(counts.get(s, 0) for s in todo) or None)
        bar.extra = {"shards": f"0/{len(todo)}", "actors": self.num_actors}
        actors = [self._new_actor() for _ in range(min(self.num_actors, max(len(todo), 1)))]
        live = set(range(len(actors)))   # slots whose actor runs; a replacement joins once started
        starting: dict = {}      # readiness ref of a replacement actor -> its slot
        inflight: dict = {}      # task ref -> (slot, shard, the actor it was sent to)
        attempts: dict = {}
        done, failed_samples, failed_shards, restarts = 0, [], [], 0
        busy_s = io_s = 0.0     # worker seconds on shards, and of those waiting on input/output
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        idle_since = None

        def fill():
            """Two tasks per live actor: one running, one queued behind it."""
            # breadth first: every actor gets its first shard before any gets a second (with as
            # few shards as actors, depth first would queue them all behind the first actor)
            for depth in (1, 2):
                for i in sorted(live):
                    if todo and sum(1 for a, _, _ in inflight.values() if a == i) < depth:
                        shard = todo.popleft()
                        ref = actors[i].process.remote(shard, str(output_path(out_dir, shard)))
                        inflight[ref] = (i, shard, actors[i])

        fill()
        while inflight or (todo and starting):
            if not inflight:   # every live actor lost: wait (bounded) for a replacement to start
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > self.start_timeout:
                    raise StageFailed(f"{self.stage}: no worker could be started in "
                                      f"{self.start_timeout:.0f}s; {len(todo)} shards left")
            ready, _ = ray.wait(list(inflight) + list(starting), num_returns=1, timeout=5.0)
            if not ready:
                continue
            ref = ready[0]
            if ref in starting:
                i = starting.pop(ref)
                try:
                    ray.get(ref)
                    live.add(i)
                    idle_since = None
                except (RayActorError, WorkerCrashedError) as e:
                    self._raise_if_init_failed(e)
                    pass           # the replacement died before starting; others carry on
                fill()
                continue
            i, shard, actor = inflight.pop(ref)
            try:
                res = ray.get(ref)
            except (RayActorError, WorkerCrashedError) as e:
                self._raise_if_init_failed(e)
                # The worker process or its node is gone: the shard goes back in the queue, and a
                # replacement is started; it gets work only once running, so a cluster that lost
                # capacity (a removed node) carries on with the actors it still has.
                attempts[shard] = attempts.get(shard, 0) + 1
                if attempts[shard] > self.max_retries:
                    raise StageFailed(f"{shard}: lost its worker {attempts[shard]} times: {e}") from e
                todo.appendleft(shard)
                if actors[i] is actor:   # replace a dead actor once (its queued task fails too)
                    live.discard(i)
                    actors[i] = self._new_actor()
                    starting[actors[i].pid.remote()] = i
                    restarts += 1
                    why = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    print(f"[{self.stage}] worker lost ({type(e).__name__}: {why}); {shard_basename(shard)} "
                          f"requeued, replacement actor starting", flush=True)
            except RayTaskError as e:
                # The shard itself is bad (e.g. an unreadable tar): recorded, the stage goes on.
                reason = str(e.cause if e.cause is not None else e).splitlines()[0]
                failed_shards.append({"shard": shard, "reason": reason})
                print(f"[{self.stage}] shard failed: {shard}: {reason}", flush=True)
                bar.update(0, failed=counts.get(shard, 1))
            else:
                done += 1
                failed_samples += res["failed"]
                busy_s += res["seconds"]
                io_s += res.get("read_wait_seconds", 0.0) + res.get("write_seconds", 0.0)
                with open(self.log_path, "a") as f:
                    f.write(json.dumps({k: v for k, v in res.items() if k != "failed"}) + "\n")
                bar.extra["shards"] = f"{done}/{done + len(todo) + len(inflight)}"
                bar.update(res["samples"], failed=len(res["failed"]))
            fill()
        for a in actors:
            ray.kill(a)
        if todo:   # every worker was lost and none could be restarted: never report success
            raise StageFailed(f"{self.stage}: no worker left to run {len(todo)} shards "
                              f"({restarts} restarts); first: {todo[0]}")
        io_share = io_s / busy_s if busy_s else 0.0
        stats = bar.close(f"{done} shards written, {skipped} already there, {len(failed_shards)} "
                          f"shards failed, {restarts} workers restarted; workers waited on I/O "
                          f"{100 * io_share:.1f}% of their time")
        summary = {**stats, "shards_done": done, "shards_skipped": skipped, "restarts": restarts,
                   "io_wait_share": round(io_share, 4),
                   "failed": failed_samples, "failed_shards": failed_shards}
        lost = len(failed_samples) + sum(counts.get(f["shard"], 1) for f in failed_shards)
        if lost > self.cfg.ray.max_failures * (total_samples or 1):
            raise StageFailed(f"{self.stage}: {len(failed_samples)} samples and {len(failed_shards)} "
                              f"shards failed, over ray.max_failures={self.cfg.ray.max_failures}: "
                              f"{(failed_shards + failed_samples)[:5]}")
        return summary
