"""Arguments several `psa-dist` subcommands share: a config with overrides, ``--from``,
``--launcher``, the test-time scales."""
from __future__ import annotations

import argparse

from ..cluster.launch import LAUNCHERS
from ..config import Config, load_config
from ..stages import table


def config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("config", nargs=None if required else "?", help="YAML config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train_cls.epochs=2")


def load(args) -> Config:
    return load_config(args.config, args.overrides)


def from_arg(p, help: str) -> None:
    """``--from STAGE`` (``random-walk`` or ``random_walk``), parsed to the stage's name."""
    p.add_argument("--from", dest="redo_from", metavar="STAGE", help=help,
                   type=lambda v: v.replace("-", "_"), choices=list(table.ORDER))


def launcher_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--launcher", choices=list(LAUNCHERS),
                   help="where the trainers run (sets train_*.launcher): in this process, as a "
                        "torchrun rank, as a submitit job on this machine, or as a SLURM job")


def test_time_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument("--scales", type=float, nargs="+", default=[1.0],
                   help=f"{prefix}test scales, e.g. 0.75 1.0 1.25 (softmax averaged)")
    p.add_argument("--flip", action="store_true", help=f"{prefix}average with the mirror image")
