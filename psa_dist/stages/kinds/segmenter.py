"""The segmenters: ``seg`` trained on the random walk's pseudo labels (its background distrusted
where an image's class is missing from them, ``train_seg.missing_class_frac``), and ``seg_full``
on the ground-truth masks, the fully supervised upper bound it is compared with. One architecture
(``model.segmenter``: the light head on the backbone, or DeepLabV3-ResNet50), per-pixel cross
entropy with 255 ignored."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch.nn.functional as F

from ...data.augment import IGNORE
from ...data.train_data import Target
from ...nets.models import build_segmenter, deeplab_weights
from .base import GPU_BACKBONES, PANELS, ModelKind, image_panel, label_panel

GPU_SEGMENTERS = ("deeplabv3_resnet50",)


class SegmenterKind(ModelKind):
    network, timing_key = "segmenter", "seg"     # both segmenters: one timing, one cache entry
    frozen_backbone_layers = False
    min_train_batch = 2      # ASPP's pooled branch has BN on 1x1 maps: batch 1 fails

    def __init__(self, name: str, target: Target):
        self.name, self.target = name, target

    def architecture(self, cfg, num_classes):
        bare = dataclasses.replace(cfg.model, pretrained=None, seg_pretrained=None)
        return build_segmenter(bare, num_classes + 1)

    def to_train(self, cfg, num_classes, trained):
        seg = build_segmenter(cfg.model, num_classes + 1)
        if cfg.model.seg_from_classifier:
            seg.backbone.load_state_dict(trained("cls").backbone.state_dict())
        return seg

    def describe(self, cfg):
        return cfg.model.segmenter

    def initial_weights(self, cfg):
        m = cfg.model
        if m.seg_from_classifier:
            return "the trained classifier's backbone (model.seg_from_classifier)"
        if m.segmenter == "deeplabv3_resnet50":
            weights = deeplab_weights(m)
            if weights is None:
                return None
            return (f"model.seg_pretrained={weights}" if weights == m.seg_pretrained
                    else f"model.pretrained={weights}")
        return super().initial_weights(cfg)

    def random_init_key(self, cfg):
        return ("model.seg_pretrained" if cfg.model.segmenter == "deeplabv3_resnet50"
                else "model.pretrained")

    def starts_pretrained(self, cfg):
        return self.initial_weights(cfg) is not None

    def losses(self, cfg, tcfg):
        def loss_of(class_terms: bool):
            def loss(model, x, y):
                return F.cross_entropy(model(x).float(), y, ignore_index=IGNORE)
            return loss
        return loss_of

    def gpu_network(self, cfg):
        m = cfg.model
        if m.segmenter in GPU_SEGMENTERS:
            return f"model.segmenter={m.segmenter}"
        if m.backbone in GPU_BACKBONES:     # the light segmenter is built on the backbone
            return f"the {m.segmenter} segmenter on model.backbone={m.backbone}"
        return None

    def panels(self, model, x, y, palette):
        # the image, its label and the prediction
        x, y = x[:PANELS], y[:PANELS]
        size = x.shape[-2:]
        return [np.concatenate([image_panel(xi), label_panel(yi, size, palette),
                                label_panel(pi, size, palette)], 1)
                for xi, yi, pi in zip(x, y, model(x).argmax(1))]


SEG = SegmenterKind("seg", Target("seg", fields=("image", "cls"), joined=("pseudo",),
                                  label="pseudo", distrust_background=True))
SEG_FULL = SegmenterKind("seg_full", Target("seg_full", fields=("image", "mask"), label="mask"))
