"""IRN's class-boundary branch (``irn``, method irn): a frozen backbone with the boundary head of
``nets.models.BoundaryNet``, trained on the inter-pixel relations of ``ir_labels`` within
``model.irn_radius`` cells of its stride-4 grid: the affinity of a pair is one minus the largest
boundary value between them, and the loss is AffinityNet's on those affinities
(``core.boundary``, ``core.affinity.relation_loss``). One learning rate for the whole head, as the
authors (their displacement branch, for instances, is not trained)."""
from __future__ import annotations

import copy

import numpy as np
import torch

from ...core.affinity import pair_label_masks, relation_loss
from ...core.boundary import boundary_affinity, reduce_labels
from ...data.train_data import Target
from ...nets.backbones import build_backbone
from ...nets.models import BoundaryNet
from .base import PANELS, ModelKind, image_panel, label_panel


class BoundaryNetKind(ModelKind):
    name, network, timing_key = "irn", "IRN boundary branch", "irn"
    target = Target("irn", fields=("image",), joined=("ir",), label="ir")
    frozen_backbone_layers = False        # the whole backbone is frozen
    uniform_lr = True

    def architecture(self, cfg, num_classes):
        return BoundaryNet(build_backbone(cfg.model.backbone))

    def to_train(self, cfg, num_classes, trained):
        m = cfg.model
        backbone = (copy.deepcopy(trained("cls").backbone) if m.irn_backbone == "classifier"
                    else build_backbone(m.backbone, m.pretrained))
        return BoundaryNet(backbone)

    def describe(self, cfg):
        return f"{cfg.model.backbone} IRN boundary branch"

    def initial_weights(self, cfg):
        if cfg.model.irn_backbone == "classifier":
            return "the trained classifier's backbone, frozen (model.irn_backbone=classifier)"
        return f"model.pretrained={cfg.model.pretrained}, frozen (model.irn_backbone=pretrained)"

    def random_init_key(self, cfg):
        return "model.irn_backbone"

    def starts_pretrained(self, cfg):
        return True

    def losses(self, cfg, tcfg):
        radius, border = cfg.model.irn_radius, tcfg.pair_border

        def loss_of(class_terms: bool):
            def loss(model, x, y):
                boundary = torch.sigmoid(model(x).float())
                labels = reduce_labels(y, 4)
                if labels.shape[-2:] != boundary.shape[-2:]:
                    raise ValueError(f"IRN's boundary map is {tuple(boundary.shape[-2:])} cells, "
                                     f"its labels reduce to {tuple(labels.shape[-2:])}: "
                                     f"train_irn.crop_size must be a multiple of 4")
                return relation_loss(boundary_affinity(boundary, radius),
                                     pair_label_masks(labels, radius, border))
            return loss
        return loss_of

    def panels(self, model, x, y, palette):
        # the image, its relation labels and the boundary map
        x, y = x[:PANELS], y[:PANELS]
        edge = torch.sigmoid(model(x).float())[:, None]
        edge = torch.nn.functional.interpolate(edge, size=x.shape[-2:], mode="bilinear",
                                               align_corners=False)[:, 0]
        heat = [(e.cpu().numpy()[..., None] * np.array([255, 255, 255])).astype(np.uint8)
                for e in edge]
        return [np.concatenate([image_panel(xi), label_panel(yi, x.shape[-2:], palette), hi], 1)
                for xi, yi, hi in zip(x, y, heat)]


KIND = BoundaryNetKind()
