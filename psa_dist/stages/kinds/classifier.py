"""The classifier (``cls``): the backbone with a 1x1 class layer, trained on image-level labels
with the multi-label soft-margin loss; its CAMs are what everything after it starts from. Its
held-out set (``stop_patience``) is the val split's image labels; with ``fit_target`` it stops when
its training loss has fit the labels (class by class with ``fit_each_class``)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...data.train_data import Target
from ...nets.backbones import build_backbone
from ...nets.models import Classifier, build_classifier, freeze_layers
from .base import PANELS, ModelKind, image_panel


class ClassifierKind(ModelKind):
    name, network, timing_key = "cls", "classifier", "cls"
    target = Target("cls", fields=("image", "cls"))
    heldout_split = True

    def architecture(self, cfg, num_classes):
        m = cfg.model
        return Classifier(build_backbone(m.backbone), num_classes, m.cls_dropout)

    def to_train(self, cfg, num_classes, trained):
        net = build_classifier(cfg.model, num_classes)
        freeze_layers(net.backbone, cfg.model.frozen_layers)
        return net

    def losses(self, cfg, tcfg):
        def loss_of(class_terms: bool):
            def loss(model, x, y):
                logits = model(x).float()
                return (Classifier.class_losses(logits, y) if class_terms
                        else Classifier.loss(logits, y))
            return loss
        return loss_of

    def example_target(self, label_at, present, num_classes, crop, batch, cfg):
        y = torch.zeros(batch, num_classes)
        y[:, torch.tensor(present) - 1] = 1
        return y

    def panels(self, model, x, y, palette):
        # the image and the maximum of its CAMs over the classes
        x = x[:PANELS]
        cams = F.relu(model.cams(x)).float().amax(1, keepdim=True)
        cams = F.interpolate(cams, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        cams = cams / cams.flatten(1).amax(1).clamp(min=1e-5)[:, None, None]
        return [np.concatenate([image_panel(xi), (ci.cpu().numpy()[..., None]
                                                  * np.array([255, 64, 0])).astype(np.uint8)], 1)
                for xi, ci in zip(x, cams)]


KIND = ClassifierKind()
