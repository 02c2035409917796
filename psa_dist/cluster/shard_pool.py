"""The one scheduler of work over shards: a pool of Ray actors, or this process, running a worker
over (input shard, output shard) tasks with the same accounting either way.

A worker is any class built as ``worker_cls(*worker_args, device=..., threads=...)`` whose
``process(in_shard, out_shard)`` writes one output shard (atomically) and returns a dict with at
least ``samples``, ``failed`` (the samples it could not process, with key and reason) and
``seconds``. On Ray there is one actor per GPU (``num_gpus=1``) when the work wants GPUs and the
cluster has them, else one per CPU; every actor runs with one intra-op thread on CPU, so the bytes
written do not depend on how many actors there are. Each actor holds one shard at a time: a shard
queued behind a slow actor would wait for it while others idle, and the driver's round trip
between shards (milliseconds) is small beside a shard's work (seconds to minutes).

Reliability:
- a task whose output exists is skipped, so a rerun resumes (temp files of a dead run are removed);
- a task lost with its actor (process killed, node removed) puts the shard back in the queue and a
  new actor is started in the old one's place, on whatever nodes remain;
- a task that raises a transient error (``transient(exc)``; by default an OSError, CUDA out of
  memory, a RuntimeError) is retried up to ``shard_retries`` times after ``retry_backoff_s``
  (doubling), preferably on another actor; a deterministic one (a corrupt shard, a bug) is
  recorded at once. The verdict is made where the exception was raised, with its ``__cause__``
  (which Ray does not send to the driver), and travels with it. A recorded shard fails the run
  only when failed samples exceed ``max_failures`` (a share of all samples);
- a straggler: once no shard is waiting, an idle actor runs a copy of a shard that has run
  ``speculate_after`` times longer than the shards done so far (per sample, at least
  ``speculate_min_s``); the first copy to finish counts, the other is cancelled and ignored
  (outputs are renamed into place atomically and are byte-identical, so either may land).
Every finished shard adds a line to ``log_path`` (JSON lines) in both modes, with its attempts;
with ``log_dir`` each actor's stdout and stderr go to a file of its own there (``pool_actor``).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from .pool_actor import TRANSIENT_ATTR, PoolActor
from .ray_scheduler import RayScheduler
from .tally import StageFailed, Tally as _Tally, why as _why

__all__ = ["RETRY_ON", "ShardPool", "StageFailed", "default_transient", "ensure_ray"]

# Errors worth another try: a network filesystem hiccup, CUDA out of memory (torch's
# OutOfMemoryError is a RuntimeError), a driver or library glitch. Anything else (ValueError,
# KeyError, ...) is a bug or bad data that would fail the same way again.
RETRY_ON = (OSError, RuntimeError, MemoryError)


def default_transient(exc: BaseException) -> bool:
    """Worth another try: an error of a type in :data:`RETRY_ON`."""
    return isinstance(exc, RETRY_ON)


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


class ShardPool:
    """Runs ``worker_cls`` over shards, on Ray actors (``use_ray``) or in this process.

    ``log_dir``: where each Ray actor's stdout/stderr go (one file per actor; None: Ray's own
    node-local logs). ``transient``: a picklable function telling an error worth another try
    (module level: it runs in the actors too)."""

    def __init__(self, name: str, worker_cls, worker_args: tuple, *, use_ray: bool = True,
                 num_actors: int = 0, use_gpus: bool = True, max_failures: float = 0.001,
                 log_path=None, local_device: str = "cpu", local_threads: int = 1,
                 max_retries: int = 3, start_timeout: float = 600.0, log_dir=None,
                 shard_retries: int = 2, retry_backoff_s: float = 2.0,
                 transient=default_transient,
                 speculate_after: float = 3.0, speculate_min_s: float = 30.0):
        self.name, self.worker_cls, self.worker_args = name, worker_cls, tuple(worker_args)
        self.use_ray, self.max_failures, self.max_retries = use_ray, max_failures, max_retries
        self.local_device, self.local_threads = local_device, local_threads
        self.start_timeout = start_timeout
        self.log_path = Path(log_path) if log_path else Path(f"{name}.shards.jsonl")
        self.log_dir = str(log_dir) if log_dir else None
        self.shard_retries, self.retry_backoff_s = shard_retries, retry_backoff_s
        self.transient = transient
        self.speculate_after, self.speculate_min_s = speculate_after, speculate_min_s
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
        self.actor_cls = ray.remote(PoolActor).options(
            num_cpus=1, num_gpus=1 if self.gpus else 0, max_concurrency=1)

    def run(self, tasks: list, counts: dict | None = None) -> dict:
        """Process ``tasks`` ((input shard, output path) pairs); ``counts`` maps an input shard to
        its number of samples. Returns the summary; raises :class:`StageFailed`."""
        counts = {str(k): v for k, v in (counts or {}).items()}
        todo = [(str(i), str(o)) for i, o in tasks if not Path(o).is_file()]
        for _, out in todo:   # temp files of a killed run: never renamed, only in the way
            for tmp in Path(out).parent.glob(f".{Path(out).name}.*.tmp"):
                tmp.unlink(missing_ok=True)
        tally = _Tally(self.name, [i for i, _ in todo], counts, self.log_path)
        skipped = len(tasks) - len(todo)
        self.counts = counts
        restarts = self._run_ray(todo, tally) if self.use_ray else self._run_here(todo, tally)
        return tally.summary(skipped, restarts, self.max_failures)

    def _retry_delay(self, tally: _Tally, shard: str, exc: BaseException,
                     attempt: int) -> float | None:
        """After ``shard``'s ``attempt``-th try raised ``exc``: the seconds to wait before the
        next try, or None once it is recorded as failed (a deterministic error, or out of tries)."""
        why = _why(exc)
        transient = getattr(exc, TRANSIENT_ATTR, None)     # judged by the actor that raised it
        if transient is None:
            transient = self.transient(exc)
        if not transient:
            tally.shard_failed(shard, f"{why} (not retried: a {type(exc).__name__} does not go "
                                      f"away on another try)", attempt)
            return None
        if attempt > self.shard_retries:
            tally.shard_failed(shard, f"{why} (after {attempt} attempts)", attempt)
            return None
        delay = self.retry_backoff_s * 2 ** (attempt - 1)
        tally.retries += 1
        print(f"[{self.name}] {shard}: {why}; retry {attempt}/{self.shard_retries} in "
              f"{delay:.1f}s", flush=True)
        return delay

    # ---------------------------------------------------------------- in this process
    def _run_here(self, todo: list, tally: _Tally) -> int:
        try:
            worker = self.worker_cls(*self.worker_args, device=self.local_device,
                                     threads=self.local_threads)
        except Exception as e:   # noqa: BLE001 - the same message as a Ray worker that fails to start
            raise StageFailed(f"{self.name}: the worker failed to start: {e}") from e
        for k, (shard, out) in enumerate(todo):
            attempt = 0
            while True:
                attempt += 1
                try:
                    res = worker.process(shard, out)
                except Exception as e:  # noqa: BLE001 - retried or recorded, the work goes on
                    delay = self._retry_delay(tally, shard, e, attempt)
                    if delay is None:
                        break
                    time.sleep(delay)
                    continue
                res["attempts"] = attempt
                tally.finished(res, len(todo) - k - 1)
                break
        return 0

    # ---------------------------------------------------------------- on Ray actors
    def _new_actor(self):
        kwargs = {"device": "cuda" if self.gpus else "cpu", "threads": 1}
        return self.actor_cls.remote(self.worker_cls, self.worker_args, kwargs, self.log_dir,
                                     self.name, self.transient)

    def _raise_if_init_failed(self, e: Exception) -> None:
        # A worker whose constructor raised (bad checkpoint, missing file) fails the same way on
        # every retry: stop with its error instead of restarting it.
        if getattr(e, "actor_init_failed", False):
            raise StageFailed(f"{self.name}: a worker failed to start: {e}") from e

    def _run_ray(self, tasks: list, tally: _Tally) -> int:
        return RayScheduler(self, tasks, tally).run()
