"""The accounting of a :class:`~psa_dist.cluster.shard_pool.ShardPool` run, the same on Ray and in
this process: shards done and failed, failed samples, retries, worker time, the per-shard log and
the closing summary (which raises :class:`StageFailed` over the failure threshold)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..util.progress import Progress


class StageFailed(RuntimeError):
    """More failures than the configured threshold; the message says which shards and samples."""


def why(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Tally:
    """What both modes count: shards done and failed, failed samples, retries, worker time, the
    log."""

    def __init__(self, name: str, todo: list, counts: dict, log_path: Path):
        self.name, self.counts, self.log_path = name, counts, log_path
        total = sum(counts.get(s, 0) for s in todo) or None
        self.bar = Progress(name.replace("_", "-"), total=total)
        self.bar.extra = {"shards": f"0/{len(todo)}"}
        self.done, self.failed_samples, self.failed_shards = 0, [], []
        self.retries = self.speculative = 0   # tries after a transient error; straggler copies
        self.busy_s = self.io_s = 0.0     # worker seconds on shards, and of those on input/output
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # a driver killed mid-write may have left a cut last line: start ours on a line of its own
        if log_path.is_file() and log_path.stat().st_size:
            with open(log_path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")

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

    def shard_failed(self, shard: str, reason: str, attempts: int = 1) -> None:
        self.failed_shards.append({"shard": shard, "reason": reason, "attempts": attempts})
        print(f"[{self.name}] shard failed: {shard}: {reason}", flush=True)
        self.bar.update(0, failed=self.counts.get(shard, 1))

    def summary(self, skipped: int, restarts: int, max_failures: float) -> dict:
        io_share = self.io_s / self.busy_s if self.busy_s else 0.0
        stats = self.bar.close(
            f"{self.done} shards written, {skipped} already there, {len(self.failed_shards)} "
            f"shards failed, {self.retries} retries, {self.speculative} straggler copies, "
            f"{restarts} workers restarted; workers waited on I/O {100 * io_share:.1f}% of "
            f"their time")
        total = sum(self.counts.values()) or 1
        lost = len(self.failed_samples) + sum(self.counts.get(f["shard"], 1)
                                              for f in self.failed_shards)
        if lost > max_failures * total:
            raise StageFailed(f"{self.name}: {len(self.failed_samples)} samples and "
                              f"{len(self.failed_shards)} shards failed, over "
                              f"ray.max_failures={max_failures}: "
                              f"{(self.failed_shards + self.failed_samples)[:5]}")
        return {**stats, "shards_done": self.done, "shards_skipped": skipped,
                "restarts": restarts, "retries": self.retries,
                "speculative": self.speculative, "io_wait_share": round(io_share, 4),
                "failed": self.failed_samples, "failed_shards": self.failed_shards}


