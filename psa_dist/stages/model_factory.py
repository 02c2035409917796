"""The one model factory: a model of the stage table, built to be trained or loaded trained from
its checkpoint in the run directory, by its kind (``kinds/``). The trainers, the label workers,
eval, report, export and the benchmarks all take their models from here."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..nets.checkpoint import load_weights
from . import table
from .run_dir import Run


def load_trained(run: Run, model: str, device: torch.device | str | None = None) -> nn.Module:
    """``model`` with the weights its stage trained, in eval mode on ``device`` (the run's by
    default); a missing checkpoint names the stage to run."""
    path = run.checkpoint(model)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `psa-dist "
                                f"{table.stage(table.MODELS[model].stage).cli} CONFIG` first")
    net = load_weights(table.kind(model).architecture(run.cfg, run.num_classes), path)
    return net.to(device if device is not None else run.device).eval()


def model_to_train(run: Run, model: str) -> nn.Module:
    """The initial weights of ``model`` for its trainer: the classifier from ``model.pretrained``
    (or random), AffinityNet from the trained classifier's backbone (as the paper does), the
    segmenters from their pretrained backbones or, with ``model.seg_from_classifier``, from the
    trained classifier's."""
    return table.kind(model).to_train(run.cfg, run.num_classes,
                                      lambda name: load_trained(run, name, "cpu"))
