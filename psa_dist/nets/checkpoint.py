"""Checkpoint files: plain dicts of tensors, numbers and strings (model, optimizer, scheduler, grad
scaler, counters, RNG states, config), written atomically and read without unpickling code."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..util.atomic import atomic_path


def save_checkpoint(path: Path, state: dict) -> None:
    # fsynced before the rename: after a crash or power loss the name holds the old checkpoint or
    # the whole new one, never a truncated file that a resume would fail to read
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict:
    # weights_only: a checkpoint is plain tensors, numbers and strings; never unpickle code.
    return torch.load(path, map_location="cpu", weights_only=True)


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """``model`` with the weights of the checkpoint at ``path``; a missing file says which stage
    to run."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the stage that trains it first")
    model.load_state_dict(load_checkpoint(path)["model"])
    return model
