"""The one model factory: a model of the stage table, built to be trained or loaded trained from
its checkpoint in the run directory. The trainers, the label workers, eval, report and the
benchmarks all take their models from here."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from ..nets.backbones import build_backbone
from ..nets.checkpoint import load_weights
from ..nets.models import (AffinityNet, Classifier, build_classifier, build_segmenter,
                           deeplab_weights, freeze_layers)
from . import table
from .run_dir import Run


def architecture(cfg, model: str, num_classes: int) -> nn.Module:
    """The untrained network of ``model`` with no pretrained weights read (a checkpoint replaces
    every weight)."""
    m = cfg.model
    if model == "cls":
        return Classifier(build_backbone(m.backbone), num_classes, m.cls_dropout)
    if model == "aff":
        return AffinityNet(build_backbone(m.backbone), m.aff_dims, m.aff_stride)
    if model in ("seg", "seg_full"):
        bare = dataclasses.replace(m, pretrained=None, seg_pretrained=None)
        return build_segmenter(bare, num_classes + 1)
    raise ValueError(f"unknown model {model!r} (have {', '.join(table.MODELS)})")


def load_trained(run: Run, model: str, device: torch.device | str | None = None) -> nn.Module:
    """``model`` with the weights its stage trained, in eval mode on ``device`` (the run's by
    default); a missing checkpoint names the stage to run."""
    path = run.checkpoint(model)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `psa-dist "
                                f"{table.stage(table.MODELS[model].stage).cli} CONFIG` first")
    net = load_weights(architecture(run.cfg, model, run.num_classes), path)
    return net.to(device if device is not None else run.device).eval()


def initial_weights(cfg, model: str) -> str | None:
    """Where ``model``'s trainer takes its starting weights from, in words; None when it starts
    from random weights (the trainer logs that, naming the config key that would change it)."""
    m = cfg.model
    if model == "aff":
        return "the trained classifier's backbone"
    if model in ("seg", "seg_full"):
        if m.seg_from_classifier:
            return "the trained classifier's backbone (model.seg_from_classifier)"
        if m.segmenter == "deeplabv3_resnet50":
            weights = deeplab_weights(m)
            if weights is None:
                return None
            return (f"model.seg_pretrained={weights}" if weights == m.seg_pretrained
                    else f"model.pretrained={weights}")
    return f"model.pretrained={m.pretrained}" if m.pretrained else None


def random_init_key(cfg, model: str) -> str:
    """The config key that gives ``model`` pretrained weights."""
    if model in ("seg", "seg_full") and cfg.model.segmenter == "deeplabv3_resnet50":
        return "model.seg_pretrained"
    return "model.pretrained"


def model_to_train(run: Run, model: str) -> nn.Module:
    """The initial weights of ``model`` for its trainer: the classifier from ``model.pretrained``
    (or random), AffinityNet from the trained classifier's backbone (as the paper does), the
    segmenters from their pretrained backbones or, with ``model.seg_from_classifier``, from the
    trained classifier's."""
    cfg = run.cfg
    if model in ("cls", "aff"):
        net = (build_classifier(cfg.model, run.num_classes) if model == "cls" else
               AffinityNet.from_classifier(load_trained(run, "cls", "cpu"), cfg.model.aff_dims,
                                           cfg.model.aff_stride))
        freeze_layers(net.backbone, cfg.model.frozen_layers)
        return net
    if model in ("seg", "seg_full"):
        seg = build_segmenter(cfg.model, run.num_classes + 1)
        if cfg.model.seg_from_classifier:
            seg.backbone.load_state_dict(load_trained(run, "cls", "cpu").backbone.state_dict())
        return seg
    raise ValueError(f"unknown model {model!r} (have {', '.join(table.MODELS)})")
