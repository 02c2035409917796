"""AffinityNet (``aff``): the classifier's backbone with the paper's feature layers, trained from
the trained classifier's weights on the confident-region affinity labels of ``aff_labels``
(``core.affinity.affinity_loss`` on the pairs within ``random_walk.radius``), its labels on the
image's cell grid of ``model.aff_stride``."""
from __future__ import annotations

import numpy as np

from ...core.affinity import affinity_loss, cell_grid
from ...data.train_data import Target
from ...nets.backbones import build_backbone
from ...nets.models import AffinityNet, freeze_layers
from .base import PANELS, ModelKind, image_panel, label_panel


class AffinityNetKind(ModelKind):
    name, network, timing_key = "aff", "AffinityNet", "aff"
    target = Target("aff", fields=("image",), joined=("aff",), label="aff", on_cells=True)

    def architecture(self, cfg, num_classes):
        m = cfg.model
        return AffinityNet(build_backbone(m.backbone), m.aff_dims, m.aff_stride)

    def to_train(self, cfg, num_classes, trained):
        # from the trained classifier's backbone, as the paper does
        net = AffinityNet.from_classifier(trained("cls"), cfg.model.aff_dims, cfg.model.aff_stride)
        freeze_layers(net.backbone, cfg.model.frozen_layers)
        return net

    def describe(self, cfg):
        return f"{cfg.model.backbone} AffinityNet"

    def initial_weights(self, cfg):
        return "the trained classifier's backbone"

    def label_stride(self, cfg):
        return cfg.model.aff_stride

    def losses(self, cfg, tcfg):
        radius, border = cfg.random_walk.radius, tcfg.pair_border

        def loss_of(class_terms: bool):
            def loss(model, x, y):
                # the labels come on its feature grid already (the loader crops them on the cells)
                f = model(x).float()
                if f.shape[-2:] != y.shape[-2:]:
                    raise ValueError(f"AffinityNet's features are {tuple(f.shape[-2:])} cells, its "
                                     f"labels {tuple(y.shape[-2:])}: model.aff_stride and the "
                                     f"labels' stride differ")
                return affinity_loss(f, y, radius=radius, border=border)
            return loss
        return loss_of

    def example_target(self, label_at, present, num_classes, crop, batch, cfg):
        lab = label_at(cell_grid(crop, crop, cfg.model.aff_stride))
        lab[:, 1:][lab[:, 1:] != lab[:, :-1]] = 255    # a neutral band where the label changes
        return lab[None].repeat(batch, 1, 1)

    def panels(self, model, x, y, palette):
        # the image and the affinity labels it trains on
        return [np.concatenate([image_panel(xi), label_panel(yi, x.shape[-2:], palette)], 1)
                for xi, yi in zip(x[:PANELS], y[:PANELS])]


KIND = AffinityNetKind()
