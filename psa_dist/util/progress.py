"""Progress for long-running commands: rate, ETA and a closing summary, on stderr."""
from __future__ import annotations

import sys
import time


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """``Progress("cams", total=800, unit="img")``; call ``update(n)``; ``close()`` prints a summary.

    Prints at most every ``interval`` seconds (and always at the end) so logs stay readable.
    """

    def __init__(self, name: str, total: int | None = None, unit: str = "img",
                 interval: float = 2.0, stream=None, enabled: bool = True):
        self.name, self.total, self.unit, self.interval = name, total, unit, interval
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.done = 0
        self.failed = 0
        self.extra: dict = {}
        self.start = time.monotonic()
        self._last = 0.0

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    def line(self) -> str:
        parts = [f"[{self.name}]"]
        parts.append(f"{self.done}/{self.total}" if self.total else f"{self.done}")
        parts.append(f"{self.unit}s  {self.rate:.1f} {self.unit}/s")
        if self.total and self.rate > 0:
            parts.append(f"ETA {_fmt_time((self.total - self.done) / self.rate)}")
        if self.failed:
            parts.append(f"failed {self.failed}")
        parts += [f"{k} {v}" for k, v in self.extra.items()]
        return "  ".join(parts)

    def update(self, n: int = 1, failed: int = 0, **extra) -> None:
        self.done += n
        self.failed += failed
        self.extra.update(extra)
        now = time.monotonic()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            print(self.line(), file=self.stream, flush=True)

    def close(self, summary: str = "") -> dict:
        stats = {"name": self.name, "done": self.done, "failed": self.failed,
                 "seconds": round(self.elapsed, 3), "rate": round(self.rate, 3), **self.extra}
        if self.enabled:
            print(f"[{self.name}] done: {self.done} {self.unit}s in {_fmt_time(self.elapsed)} "
                  f"({self.rate:.1f} {self.unit}/s), {self.failed} failed" +
                  (f"; {summary}" if summary else ""), file=self.stream, flush=True)
        return stats
