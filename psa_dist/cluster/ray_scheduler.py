"""The Ray side of a :class:`~psa_dist.cluster.shard_pool.ShardPool`: hands shards to actors one at
a time, replaces lost actors, retries transient errors after a backoff, and runs a copy of a
straggling shard on an idle actor once nothing else is waiting.

State of a run, all in the driver (a killed driver loses none of the work: outputs on disk are the
record, and the rerun skips them):
``todo`` shards ready to run; ``waiting`` shards backing off after a transient error;
``inflight`` task ref -> (slot, shard, actor, start, copy?); ``done`` shards whose first result
was counted (a later copy's result is ignored, never counted twice).
"""
from __future__ import annotations

import heapq
import statistics
import time
from collections import deque
from pathlib import Path

from .tally import StageFailed, why


class RayScheduler:
    """One run of ``pool`` over ``tasks`` on Ray; ``run()`` returns the actors restarted."""

    def __init__(self, pool, tasks: list, tally):
        self.pool, self.tally, self.ray = pool, tally, pool.ray
        self.name = pool.name
        self.out_of = dict(tasks)
        self.todo = deque(s for s, _ in tasks)
        self.waiting: list = []      # heap of (ready at, shard): transient errors backing off
        self.actors = [pool._new_actor()
                       for _ in range(min(pool.num_actors, max(len(self.todo), 1)))]
        # slots whose actor runs; a replacement joins once started
        self.live = set(range(len(self.actors)))
        self.starting: dict = {}     # readiness ref of a replacement actor -> its slot
        self.inflight: dict = {}     # task ref -> (slot, shard, actor, started, speculative)
        self.done: set = set()
        self.lost: dict = {}         # shard -> times its worker was lost under it
        self.errors: dict = {}       # shard -> transient errors it raised
        self.failed_on: dict = {}    # shard -> the slot where it last failed
        self.per_sample: list = []   # seconds per sample (or per shard) of the shards done
        self.restarts = 0
        tally.bar.extra["actors"] = pool.num_actors

    # ------------------------------------------------------------ handing out work
    def _busy(self, i: int) -> bool:
        return any(t[0] == i for t in self.inflight.values())

    def _pending(self) -> bool:
        return any(t[1] not in self.done for t in self.inflight.values())

    def _copies(self, shard: str) -> int:
        return sum(1 for t in self.inflight.values() if t[1] == shard)

    def _submit(self, i: int, shard: str, speculative: bool = False) -> None:
        ref = self.actors[i].process.remote(shard, self.out_of[shard])
        self.inflight[ref] = (i, shard, self.actors[i], time.monotonic(), speculative)

    def _take(self, i: int) -> str | None:
        """The next shard for slot ``i``: one that did not just fail on it, if there is one."""
        for shard in self.todo:
            if self.failed_on.get(shard) != i:
                self.todo.remove(shard)
                return shard
        return self.todo.popleft() if self.todo else None

    def _expected(self, shard: str) -> float:
        n = self.tally.counts.get(shard, 1) if self.tally.counts else 1
        return statistics.median(self.per_sample) * n

    def _straggler(self, now: float) -> str | None:
        """The in-flight shard most overdue (``speculate_after`` times its expected time, at least
        ``speculate_min_s``) with no copy running yet, or None."""
        p = self.pool
        if p.speculate_after <= 0 or not self.per_sample or self.todo or self.waiting:
            return None
        best, worst = None, 1.0
        for _, shard, _, started, _ in self.inflight.values():
            if shard in self.done or self._copies(shard) > 1:
                continue
            limit = max(p.speculate_after * self._expected(shard), p.speculate_min_s)
            if (now - started) / limit > worst:
                best, worst = shard, (now - started) / limit
        return best

    def _fill(self) -> None:
        now = time.monotonic()
        while self.waiting and self.waiting[0][0] <= now:
            self.todo.append(heapq.heappop(self.waiting)[1])
        for i in sorted(self.live):
            if self._busy(i):
                continue
            shard = self._take(i)
            if shard is not None:
                self._submit(i, shard)
                continue
            shard = self._straggler(now)
            if shard is None:
                return
            started = next(t[3] for t in self.inflight.values() if t[1] == shard)
            print(f"[{self.name}] {shard}: running {now - started:.1f}s, median "
                  f"{self._expected(shard):.1f}s; a copy starts on an idle actor", flush=True)
            self.tally.speculative += 1
            self._submit(i, shard, speculative=True)

    # ------------------------------------------------------------ the loop
    def run(self) -> int:
        ray, pool = self.ray, self.pool
        idle_since = None
        self._fill()
        # a copy still running after its shard was counted (the straggler's) holds nothing up
        while self._pending() or self.waiting or (self.todo and self.starting):
            if self.inflight or self.live:
                idle_since = None
            else:   # every actor lost: wait (bounded) for a replacement to start
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > pool.start_timeout:
                    raise StageFailed(f"{self.name}: no worker could be started in "
                                      f"{pool.start_timeout:.0f}s; {len(self.todo)} shards left")
            timeout = 5.0
            if self.waiting:
                timeout = min(timeout, max(0.0, self.waiting[0][0] - time.monotonic()))
            refs = list(self.inflight) + list(self.starting)
            ready = ray.wait(refs, num_returns=1, timeout=timeout)[0] if refs else []
            if not refs:
                time.sleep(timeout)
            if ready:
                self._handle(ready[0])
            self._fill()
        for a in self.actors:   # ends any copy still running, too
            ray.kill(a)
        self._clean_losers()
        if self.todo:   # every worker was lost and none could be restarted: never report success
            raise StageFailed(f"{self.name}: no worker left to run {len(self.todo)} shards "
                              f"({self.restarts} restarts); first: {self.todo[0]}")
        return self.restarts

    def _handle(self, ref) -> None:
        from ray.exceptions import (RayActorError, RayTaskError, TaskCancelledError,
                                    WorkerCrashedError)
        ray, pool = self.ray, self.pool
        if ref in self.starting:
            i = self.starting.pop(ref)
            try:
                ray.get(ref)
                self.live.add(i)
            except (RayActorError, WorkerCrashedError) as e:
                pool._raise_if_init_failed(e)   # else it died before starting; others go on
            return
        i, shard, actor, started, speculative = self.inflight.pop(ref)
        # another copy of the shard still running, or a result already counted: this task's
        # outcome changes nothing (a lost or failed copy is not retried, a late one not counted)
        moot = shard in self.done or self._copies(shard) > 0
        try:
            res = ray.get(ref)
        except (RayActorError, WorkerCrashedError) as e:
            pool._raise_if_init_failed(e)
            self._replace(i, actor, shard, e)
            if moot:
                return
            # The worker process or its node is gone: the shard goes back in the queue; the
            # replacement gets work only once running, so a cluster that lost capacity (a removed
            # node) carries on with the actors it still has.
            self.lost[shard] = self.lost.get(shard, 0) + 1
            if self.lost[shard] > pool.max_retries:
                raise StageFailed(f"{shard}: lost its worker {self.lost[shard]} times: {e}") from e
            self.todo.appendleft(shard)
        except TaskCancelledError:
            return    # a copy cancelled after the other one finished
        except RayTaskError as e:
            if moot:
                return
            cause = e.cause if e.cause is not None else e
            attempt = self.errors.get(shard, 0) + 1
            self.errors[shard] = attempt
            delay = pool._retry_delay(self.tally, shard, cause, attempt)
            if delay is not None:
                self.failed_on[shard] = i
                heapq.heappush(self.waiting, (time.monotonic() + delay, shard))
        else:
            if shard in self.done:
                return
            self.done.add(shard)
            res["attempts"] = 1 + self.errors.get(shard, 0) + self.lost.get(shard, 0)
            res["speculative"] = speculative
            n = self.tally.counts.get(shard, 1) if self.tally.counts else 1
            # the worker's own time: the driver's clock would add an actor's start to its first
            seconds = res.get("seconds", time.monotonic() - started)
            self.per_sample.append(seconds / max(n, 1))
            for other, t in self.inflight.items():
                if t[1] == shard:   # the slower copy: cancelled if still queued, else ignored
                    ray.cancel(other)
            left = len(self.todo) + len(self.waiting) + len({t[1] for t in self.inflight.values()
                                                              if t[1] not in self.done})
            self.tally.finished(res, left)

    def _replace(self, i: int, actor, shard: str, e: Exception) -> None:
        if self.actors[i] is not actor:   # replaced already
            return
        self.live.discard(i)
        self.actors[i] = self.pool._new_actor()
        self.starting[self.actors[i].pid.remote()] = i
        self.restarts += 1
        print(f"[{self.name}] worker lost ({why(e)}); {Path(self.out_of[shard]).name} "
              f"requeued, replacement actor starting", flush=True)

    def _clean_losers(self) -> None:
        """Temp files of copies killed mid-write: wait until their actors are gone, then remove."""
        refs = list(self.inflight)
        if refs:
            self.ray.wait(refs, num_returns=len(refs), timeout=10.0)
        for shard in {t[1] for t in self.inflight.values()}:
            out = Path(self.out_of[shard])
            for tmp in out.parent.glob(f".{out.name}.*.tmp"):
                tmp.unlink(missing_ok=True)
