"""The process side of a :class:`~psa_dist.cluster.shard_pool.ShardPool` actor: the wrapper that Ray
starts, which sends the actor's output to a file in the run directory and then builds the worker.

Ray leaves an actor's stdout and stderr in node-local ``/tmp/ray/session_*/logs``, which a SLURM
user cannot read once the job has ended; the run directory is shared storage, so each actor writes
``<log_dir>/<pool>-<host>-<pid>.log`` there instead (Python prints, warnings, tracebacks and C-level
output alike, since file descriptors 1 and 2 themselves point at the file).
"""
from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

# The attribute a worker's exception carries to the driver: the pool's verdict on it (transient or
# not), made here where its __cause__ is known (Ray pickles the exception without it).
TRANSIENT_ATTR = "psa_transient"


def redirect_output(log_dir, name: str) -> Path:
    """Point this process's fds 1 and 2 (and ``sys.stdout``/``sys.stderr``, which Ray's worker
    wraps around them) at ``<log_dir>/<name>-<host>-<pid>.log``; returns the path."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{name}-{socket.gethostname()}-{os.getpid()}.log"
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # Ray's worker replaced sys.stdout/err by unbuffered files on fds 1 and 2, so Python's own
    # output follows the dup2; a process started otherwise gets line-buffered ones to be sure.
    for fd_no, attr in ((1, "stdout"), (2, "stderr")):
        stream = getattr(sys, attr)
        try:
            same = stream.fileno() == fd_no
        except (OSError, ValueError, AttributeError):
            same = False
        if not same:
            setattr(sys, attr, open(fd_no, "w", buffering=1, closefd=False))
    print(f"[{name}] actor pid {os.getpid()} on {socket.gethostname()} started "
          f"{time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
    return path


class PoolActor:
    """What a pool's Ray actor runs: its output redirected (when ``log_dir`` is set), then
    ``worker_cls(*args, **kwargs)``, whose ``process`` it forwards; an error it raises carries
    ``transient(error)``."""

    def __init__(self, worker_cls, args: tuple, kwargs: dict, log_dir, name: str,
                 transient=None):
        self.log_path = redirect_output(log_dir, name) if log_dir else None
        self.transient = transient
        self.worker = worker_cls(*args, **kwargs)

    def pid(self) -> int:
        return os.getpid()

    def process(self, in_shard: str, out_shard: str) -> dict:
        try:
            res = self.worker.process(in_shard, out_shard)
        except Exception as e:
            if self.transient is not None:
                try:
                    setattr(e, TRANSIENT_ATTR, bool(self.transient(e)))
                except Exception:  # noqa: BLE001 - no verdict: the driver judges by type
                    pass
            raise
        if self.log_path is not None:
            res.setdefault("actor_log", str(self.log_path))
        return res
