"""Provenance: every command that writes outputs writes the resolved config, versions and git commit."""
from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import platform
import socket
import subprocess
import sys
from pathlib import Path

from .atomic import atomic_write_json

PACKAGES = ("psa-dist", "torch", "torchvision", "numpy", "pillow", "webdataset", "ray", "submitit",
            "pyyaml", "pycocotools", "pydensecrf2")


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    """Commit of the source tree psa_dist was imported from (None outside a git checkout)."""
    src = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True,
                             timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_info(config=None, **extra) -> dict:
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    return {
        "command": sys.argv,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "git_commit": git_commit(),
        "versions": package_versions(),
        "config": cfg,
        **extra,
    }


def write_run_info(out_dir: str | Path, config=None, name: str = "run_info.json", **extra) -> Path:
    path = Path(out_dir) / name
    atomic_write_json(path, run_info(config, **extra))
    return path
