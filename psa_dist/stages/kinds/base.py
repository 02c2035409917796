"""What a model kind provides (:class:`ModelKind`), and the TensorBoard panel pieces the kinds
share. A kind's module makes one instance (``KIND``), which the stage table's row names."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...config import Config
from ...core.image import MEAN, STD
from ...data.dataset_view import colorize
from ...data.train_data import Target
from ...engine.loop import LossFn
from ...nets.backbones import BACKBONES, layer_names
from ...nets.models import freeze_layers, set_bn_eval, unknown_layers

PANELS = 4          # images per epoch on TensorBoard
GPU_BACKBONES = ("resnet38", "resnet50")


class ModelKind:
    """A model's behaviour. ``name``: its name in the stage table (its directory in ``out_dir``);
    ``network``: what it is, in words; ``target``: what its loader decodes and trains towards;
    ``timing_key``: its entry in the precision cache (one per architecture);
    ``frozen_backbone_layers``: whether ``model.frozen_layers`` applies to it;
    ``min_train_batch``: the smallest batch its step runs with BN in train mode;
    ``heldout_split``: its held-out set (``stop_patience``) is the val split (else the last
    ``holdout_shards`` train shards, with their labels); ``uniform_lr``: one learning rate for
    all its trainable parameters (else the authors' x1 / x2 / x10 / x20 groups)."""
    name: str
    network: str
    target: Target
    timing_key: str
    frozen_backbone_layers = True
    min_train_batch = 1
    heldout_split = False
    uniform_lr = False

    def architecture(self, cfg: Config, num_classes: int) -> nn.Module:
        """The untrained network with no pretrained weights read (a checkpoint replaces every
        weight)."""
        raise NotImplementedError

    def to_train(self, cfg: Config, num_classes: int,
                 trained: Callable[[str], nn.Module]) -> nn.Module:
        """The network its trainer starts from; ``trained(name)`` loads an earlier model's
        trained weights (on the CPU)."""
        raise NotImplementedError

    def describe(self, cfg: Config) -> str:
        """Its network under ``cfg``, in a few words (``bench cost``'s tables)."""
        return cfg.model.backbone

    def initial_weights(self, cfg: Config) -> str | None:
        """Where its trainer's weights start, in words; None: random (see
        :meth:`random_init_key`)."""
        m = cfg.model
        return f"model.pretrained={m.pretrained}" if m.pretrained else None

    def random_init_key(self, cfg: Config) -> str:
        """The config key that gives it pretrained weights."""
        return "model.pretrained"

    def starts_pretrained(self, cfg: Config) -> bool:
        """Whether its BN statistics come from trained weights (frozen BN needs that)."""
        return bool(cfg.model.pretrained)

    def losses(self, cfg: Config, tcfg) -> Callable[[bool], LossFn]:
        """``losses(class_terms)``: its training loss on one batch. Under autocast the network
        runs in the low precision; its outputs are cast back to float32 so that the loss is taken
        in full precision."""
        raise NotImplementedError

    def label_stride(self, cfg: Config) -> int:
        return 1

    def timed_network(self, cfg: Config, num_classes: int) -> nn.Module:
        """The network as its trainer's step runs it, for timings (random weights): the config's
        frozen layers and BN mode, in train mode."""
        net = self.architecture(cfg, num_classes).train()
        if self.frozen_backbone_layers:
            freeze_layers(net.backbone, cfg.model.frozen_layers)
        if cfg.model.freeze_bn:
            set_bn_eval(net)
        return net

    def example_target(self, label_at: Callable[[tuple], torch.Tensor], present: list[int],
                       num_classes: int, crop: int, batch: int, cfg: Config) -> torch.Tensor:
        """A batch of targets like its loader's for a crop of ``crop`` pixels (``bench cost``):
        ``label_at(size)`` is the scene's label map at ``size``, ``present`` its class ids."""
        return label_at((crop, crop))[None].repeat(batch, 1, 1)

    def gpu_network(self, cfg: Config) -> str | None:
        """The GPU-sized network it is under ``cfg``, in words, or None (a small one)."""
        if cfg.model.backbone in GPU_BACKBONES:
            return f"the {self.network} on model.backbone={cfg.model.backbone}"
        return None

    def problems(self, cfg: Config) -> list[str]:
        """What in ``cfg`` keeps its trainer from starting, found before a run."""
        frozen = cfg.model.frozen_layers
        if frozen and self.frozen_backbone_layers and cfg.model.backbone in BACKBONES:
            problem = unknown_layers(frozen, layer_names(cfg.model.backbone), cfg.model.backbone)
            return [problem] if problem else []
        return []

    def panels(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, palette) -> list:
        """TensorBoard's rows of the batch's first few images: image | target | output."""
        raise NotImplementedError


def image_panel(x: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return ((x.float().cpu() * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()


def label_panel(y: torch.Tensor, size, palette) -> np.ndarray:
    y = F.interpolate(y[None, None].float(), size=size, mode="nearest")[0, 0].long().cpu().numpy()
    return colorize(y.astype(np.uint8), palette)
