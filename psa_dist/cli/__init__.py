"""`psa-dist`: the one command-line entry point. Each subcommand's --help says what it does.

The subcommands are grouped by what they act on, each group one module with its arguments and what
each command runs: the pipeline and its results (``pipeline_commands``), the benchmarks
(``bench_commands``), the datasets (``data_commands``); ``arguments`` holds what several share.

Building the parser imports no torch (``psa-dist --help`` answers at once): these modules import
only torch-free modules at the top, and each subcommand's function imports what it runs. That is
the one place where project imports stand inside functions (``tests/project/test_layers.py`` allows it
here only).

Layer 7, the top: may import everything below.
"""
from __future__ import annotations

import argparse
import sys

from ..cluster.shard_pool import StageFailed
from ..cluster.slurm_chain import ChainError
from ..config import ConfigError
from . import bench_commands, data_commands, pipeline_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="psa-dist",
        description="Weakly supervised semantic segmentation with AffinityNet, on Ray and torch DDP.")
    sub = parser.add_subparsers(dest="command", required=True)
    pipeline_commands.add_commands(sub)
    bench_commands.add_commands(sub)
    data_commands.add_commands(sub)
    return parser


def _user_errors() -> tuple:
    """What a user's input or data causes, said in one line (no traceback)."""
    from ..data.dataset_writer import BuildError
    from ..data.shards import ShardError
    from ..stages.export import ExportError
    return (ConfigError, ShardError, BuildError, ChainError, ExportError, FileNotFoundError,
            ImportError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also come after options (`train-cls cfg.yaml --launcher local a.b=1`)
    bad = [a for a in extra if a.startswith("-") or "=" not in a]
    if bad or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return int(args.func(args) or 0)
    except _user_errors() as e:        # evaluated only when something was raised
        print(f"psa-dist: error: {e}", file=sys.stderr)
        return 2
    except StageFailed as e:        # the work ran; too much of its input was bad
        print(f"psa-dist: failed: {e}", file=sys.stderr)
        return 1
