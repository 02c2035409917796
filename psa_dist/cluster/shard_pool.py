"""The one scheduler of work over shards: a pool of Ray actors, or this process, running a worker
over (input shard, output shard) tasks with the same accounting either way.

A worker is any class built as ``worker_cls(*worker_args, device=..., threads=...)`` whose
``process(in_shard, out_shard)`` writes one output shard (atomically) and returns a dict with at
least ``samples``, ``failed`` (the samples it could not process, with key and reason) and
``seconds``. On Ray there is one actor per GPU (``num_gpus=1``) when the work wants GPUs and the
cluster has them, else one per CPU; every actor runs with one intra-op thread on CPU, so the bytes
written do not depend on how many actors there are. Two shards are in flight per actor.

Reliability: a task whose output exists is skipped, so a rerun resumes. On Ray, a task lost with
its actor (process killed, node removed) puts the shard back in the queue and a new actor is
started in the old one's place, on whatever nodes remain. A shard that fails for a reason of its
own (unreadable input) is recorded and the work goes on; the run fails only when failed samples
exceed ``max_failures`` (a share of all samples). Every finished shard adds a line to
``log_path`` (JSON lines) in both modes.
"""
from __future__ import annotations

import json
import os
import time
from collections import deque
from pathlib import Path

from ..util.progress import Progress


class StageFailed(RuntimeError):
    """More failures than the configured threshold; the message says which shards and samples."""


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


class _Tally:
    """What both modes count: shards done and failed, failed samples, worker time, the log."""

    def __init__(self, name: str, todo: list, counts: dict, log_path: Path):
        self.name, self.counts, self.log_path = name, counts, log_path
        total = sum(counts.get(s, 0) for s in todo) or None
        self.bar = Progress(name.replace("_", "-"), total=total)
        self.bar.extra = {"shards": f"0/{len(todo)}"}
        self.done, self.failed_samples, self.failed_shards = 0, [], []
        self.busy_s = self.io_s = 0.0     # worker seconds on shards, and of those on input/output
        log_path.parent.mkdir(parents=True, exist_ok=True)

    def finished(self, res: dict, left: int) -> None:
        self.done += 1
        self.failed_samples += res["failed"]
        for f in res["failed"]:     # a bad sample is said where it is found, then counted
            print(f"[{self.name}] failed: {f.get('path') or f.get('key')}: {f['reason']}",
                  flush=True)
        self.busy_s += res["seconds"]
        self.io_s += res.get("read_wait_seconds", 0.0) + res.get("write_seconds", 0.0)
        with open(self.log_path, "a") as f:
            f.write(json.dumps({k: v for k, v in res.items() if k != "failed"}) + "\n")
        self.bar.extra["shards"] = f"{self.done}/{self.done + left}"
        self.bar.update(res["samples"], failed=len(res["failed"]))

    def shard_failed(self, shard: str, reason: str) -> None:
        self.failed_shards.append({"shard": shard, "reason": reason})
        print(f"[{self.name}] shard failed: {shard}: {reason}", flush=True)
        self.bar.update(0, failed=self.counts.get(shard, 1))

    def summary(self, skipped: int, restarts: int, max_failures: float) -> dict:
        io_share = self.io_s / self.busy_s if self.busy_s else 0.0
        stats = self.bar.close(
            f"{self.done} shards written, {skipped} already there, {len(self.failed_shards)} "
            f"shards failed, {restarts} workers restarted; workers waited on I/O "
            f"{100 * io_share:.1f}% of their time")
        total = sum(self.counts.values()) or 1
        lost = len(self.failed_samples) + sum(self.counts.get(f["shard"], 1)
                                              for f in self.failed_shards)
        if lost > max_failures * total:
            raise StageFailed(f"{self.name}: {len(self.failed_samples)} samples and "
                              f"{len(self.failed_shards)} shards failed, over "
                              f"ray.max_failures={max_failures}: "
                              f"{(self.failed_shards + self.failed_samples)[:5]}")
        return {**stats, "shards_done": self.done, "shards_skipped": skipped,
                "restarts": restarts, "io_wait_share": round(io_share, 4),
                "failed": self.failed_samples, "failed_shards": self.failed_shards}


class ShardPool:
    """Runs ``worker_cls`` over shards, on Ray actors (``use_ray``) or in this process."""

    def __init__(self, name: str, worker_cls, worker_args: tuple, *, use_ray: bool = True,
                 num_actors: int = 0, use_gpus: bool = True, max_failures: float = 0.001,
                 log_path=None, local_device: str = "cpu", local_threads: int = 1,
                 max_retries: int = 3, start_timeout: float = 600.0):
        self.name, self.worker_cls, self.worker_args = name, worker_cls, tuple(worker_args)
        self.use_ray, self.max_failures, self.max_retries = use_ray, max_failures, max_retries
        self.local_device, self.local_threads = local_device, local_threads
        self.start_timeout = start_timeout
        self.log_path = Path(log_path) if log_path else Path(f"{name}.shards.jsonl")
        if not use_ray:
            return
        import ray
        self.ray = ray
        res = ray.cluster_resources()
        self.gpus = int(res.get("GPU", 0)) if use_gpus else 0
        slots = self.gpus or max(1, int(res.get("CPU", 1)))
        # More actors than the cluster can place would sit pending with tasks queued on them.
        self.num_actors = min(num_actors or slots, slots)
        if num_actors > slots:
            print(f"[{name}] {num_actors} actors asked for, the cluster has room for {slots}",
                  flush=True)
        self.actor_cls = ray.remote(worker_cls).options(
            num_cpus=1, num_gpus=1 if self.gpus else 0, max_concurrency=1)

    def run(self, tasks: list, counts: dict | None = None) -> dict:
        """Process ``tasks`` ((input shard, output path) pairs); ``counts`` maps an input shard to
        its number of samples. Returns the summary; raises :class:`StageFailed`."""
        counts = {str(k): v for k, v in (counts or {}).items()}
        todo = [(str(i), str(o)) for i, o in tasks if not Path(o).is_file()]
        tally = _Tally(self.name, [i for i, _ in todo], counts, self.log_path)
        skipped = len(tasks) - len(todo)
        restarts = self._run_ray(todo, tally) if self.use_ray else self._run_here(todo, tally)
        return tally.summary(skipped, restarts, self.max_failures)

    # ---------------------------------------------------------------- in this process
    def _run_here(self, todo: list, tally: _Tally) -> int:
        try:
            worker = self.worker_cls(*self.worker_args, device=self.local_device,
                                     threads=self.local_threads)
        except Exception as e:   # noqa: BLE001 - the same message as a Ray worker that fails to start
            raise StageFailed(f"{self.name}: the worker failed to start: {e}") from e
        for k, (shard, out) in enumerate(todo):
            try:
                res = worker.process(shard, out)
            except Exception as e:  # noqa: BLE001 - the shard itself is bad: recorded, work goes on
                tally.shard_failed(shard, f"{type(e).__name__}: {e}".splitlines()[0])
                continue
            tally.finished(res, len(todo) - k - 1)
        return 0

    # ---------------------------------------------------------------- on Ray actors
    def _new_actor(self):
        return self.actor_cls.remote(*self.worker_args, device="cuda" if self.gpus else "cpu",
                                     threads=1)

    def _raise_if_init_failed(self, e: Exception) -> None:
        # A worker whose constructor raised (bad checkpoint, missing file) fails the same way on
        # every retry: stop with its error instead of restarting it.
        if getattr(e, "actor_init_failed", False):
            raise StageFailed(f"{self.name}: a worker failed to start: {e}") from e

    def _run_ray(self, tasks: list, tally: _Tally) -> int:
        from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError
        ray = self.ray
        out_of = dict(tasks)
        todo = deque(s for s, _ in tasks)
        tally.bar.extra["actors"] = self.num_actors
        actors = [self._new_actor() for _ in range(min(self.num_actors, max(len(todo), 1)))]
        live = set(range(len(actors)))   # slots whose actor runs; a replacement joins once started
        starting: dict = {}      # readiness ref of a replacement actor -> its slot
        inflight: dict = {}      # task ref -> (slot, shard, the actor it was sent to)
        attempts: dict = {}
        restarts, idle_since = 0, None

        def fill():
            """Two tasks per live actor: one running, one queued behind it."""
            # breadth first: every actor gets its first shard before any gets a second (with as
            # few shards as actors, depth first would queue them all behind the first actor)
            for depth in (1, 2):
                for i in sorted(live):
                    if todo and sum(1 for a, _, _ in inflight.values() if a == i) < depth:
                        shard = todo.popleft()
                        ref = actors[i].process.remote(shard, out_of[shard])
                        inflight[ref] = (i, shard, actors[i])

        fill()
        while inflight or (todo and starting):
            if not inflight:   # every live actor lost: wait (bounded) for a replacement to start
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > self.start_timeout:
                    raise StageFailed(f"{self.name}: no worker could be started in "
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
                    self._raise_if_init_failed(e)   # else it died before starting; others go on
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
                    raise StageFailed(f"{shard}: lost its worker {attempts[shard]} times: "
                                      f"{e}") from e
                todo.appendleft(shard)
                if actors[i] is actor:   # replace a dead actor once (its queued task fails too)
                    live.discard(i)
                    actors[i] = self._new_actor()
                    starting[actors[i].pid.remote()] = i
                    restarts += 1
                    why = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    print(f"[{self.name}] worker lost ({type(e).__name__}: {why}); "
                          f"{Path(out_of[shard]).name} requeued, replacement actor starting",
                          flush=True)
            except RayTaskError as e:
                # The shard itself is bad (e.g. an unreadable tar): recorded, the work goes on.
                cause = e.cause if e.cause is not None else e
                tally.shard_failed(shard, str(cause).splitlines()[0])
            else:
                tally.finished(res, len(todo) + len(inflight))
            fill()
        for a in actors:
            ray.kill(a)
        if todo:   # every worker was lost and none could be restarted: never report success
            raise StageFailed(f"{self.name}: no worker left to run {len(todo)} shards "
                              f"({restarts} restarts); first: {todo[0]}")
        return restarts
