"""Outputs written atomically, the one helper every writer of the project goes through: a temporary
name beside the target (same directory, so the rename never crosses file systems), written,
flushed and fsynced, renamed into place with ``os.replace``, and the directory fsynced where the
platform allows it. A crash or an exception never leaves a half-written file under the target's
name (an older file stays as it was), and a rerun can trust any file that exists, even after a
power loss: the data is on disk before the name points at it.

Three forms, for three kinds of writer:

* :func:`atomic_path`: the caller writes a temporary *path* (``torch.save``, a compiler's ``-o``,
  ``os.link``);
* :func:`atomic_open`: the caller streams into a file object (a tar through ``TarWriter``);
* :func:`atomic_write_bytes` / :func:`atomic_write_text` / :func:`atomic_write_json`: all at once.
"""
from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


def _tmp_name(path: Path) -> Path:
    # pid and thread: several processes or threads may write the same target at once; the last
    # rename wins and each one's temporary file is its own
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def fsync_file(path: str | Path) -> None:
    """Flush ``path``'s data to disk (for a file written by someone else: a compiler, torch)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a rename in directory ``path`` durable. Not every platform can open a directory
    (Windows) or fsync one (some network file systems): there the rename is as durable as the
    file system makes it, which is all it can be."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """``with atomic_path(p) as tmp: torch.save(obj, tmp)``: the caller writes ``tmp``; on a clean
    exit it is fsynced and renamed to ``p``; on an exception it is removed and ``p`` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{path}: nothing was written to its temporary file {tmp}")
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """``with atomic_open(p, "wb") as f: ...``: a streaming writer's file object; ``p`` appears,
    complete, only when the block ends without an exception."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open({path}): mode {mode!r}; only writing modes make sense")
    with atomic_path(path) as tmp:
        with open(tmp, mode) as f:
            yield f
            f.flush()       # fsync happens in atomic_path, after the file is closed


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
