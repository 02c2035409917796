"""The three networks of the method: classifier (CAMs), AffinityNet, segmenter."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.segmentation import deeplabv3_resnet50
from torchvision.models.segmentation.deeplabv3 import ASPP

from .backbones import build_backbone, load_pretrained


class Classifier(nn.Module):
    """Backbone -> global average pooling -> 1×1 conv without bias -> C logits.

    Trained with the multi-label soft-margin loss; ``cams(x)`` applies the same 1×1 conv to the
    feature map before pooling: ReLU class activation maps at stride 8.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.dropout = nn.Dropout2d(dropout)
        self.fc = nn.Conv2d(backbone.out_channels, num_classes, 1, bias=False)
        nn.init.xavier_uniform_(self.fc.weight)

    def new_modules(self) -> list[nn.Module]:
        return [self.fc]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return list(self.backbone(x).values())[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.dropout(self.features(x))
        return self.fc(F.adaptive_avg_pool2d(f, 1)).flatten(1)

    def cams(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.features(x)))

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.multilabel_soft_margin_loss(logits, targets)

    @staticmethod
    def class_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """:meth:`loss` class by class: each class's binary cross-entropy, averaged over the
        batch (K values; their mean is the loss)."""
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(0)

    @staticmethod
    def prior_losses(frequency: torch.Tensor) -> torch.Tensor:
        """:meth:`class_losses` of a classifier that predicts each class at its frequency in the
        labels (``frequency``: the share of images with each class), the best it can do without
        looking at the images: each class's binary entropy, 0 for a class never (or always)
        present. Their mean is :meth:`prior_loss`."""
        p = frequency.double().clamp(1e-12, 1 - 1e-12)
        return -(p * p.log() + (1 - p) * (1 - p).log())

    @staticmethod
    def prior_loss(frequency: torch.Tensor) -> float:
        """:meth:`loss` of a classifier that predicts each class at its frequency: the mean of
        :meth:`prior_losses`."""
        return float(Classifier.prior_losses(frequency).mean())


class AffinityNet(nn.Module):
    """The paper's multi-level head: a 1×1 conv + ELU per backbone tap, concat, 1×1 conv + ELU.

    For ResNet-38 the taps (512, 1024, 4096 channels) are reduced to 64 / 128 / 256 and the head
    outputs 448 channels; ``dims`` sets these for other backbones. Output at ``stride`` 8 (the
    paper), or 4 where the backbone has a stride-4 tap: finer taps are average-pooled to the output
    grid, coarser ones upsampled bilinearly.
    """

    def __init__(self, backbone: nn.Module, dims=None, stride: int = 8):
        super().__init__()
        if stride not in (4, 8):
            raise ValueError(f"model.aff_stride must be 4 or 8, got {stride}")
        self.backbone = backbone
        self.stride = stride
        taps = list(backbone.taps.items())
        dims = tuple(dims) if dims else backbone.aff_dims
        if len(dims) != len(taps):
            raise ValueError(f"AffinityNet: {len(dims)} reduction dims for {len(taps)} backbone taps")
        self.tap_names = [n for n, _ in taps]
        self.reduce = nn.ModuleList([nn.Conv2d(c, d, 1, bias=False) for (_, c), d in zip(taps, dims)])
        self.out_dim = sum(dims)
        self.head = nn.Conv2d(self.out_dim, self.out_dim, 1, bias=False)
        for m in [*self.reduce, self.head]:
            nn.init.kaiming_normal_(m.weight)
        # The authors initialise the last layer with a small gain (xavier, gain 4) so that affinities
        # start spread out; kaiming plays the same role here.

    @classmethod
    def from_classifier(cls, classifier: Classifier, dims=None, stride: int = 8) -> "AffinityNet":
        """Initialised from the trained classifier's backbone, as the paper does."""
        return cls(copy.deepcopy(classifier.backbone), dims, stride)

    def new_modules(self) -> list[nn.Module]:
        return [*self.reduce, self.head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)
        size = (-(-x.shape[-2] // self.stride), -(-x.shape[-1] // self.stride))
        parts = []
        for name, conv in zip(self.tap_names, self.reduce):
            f = feats[name]
            k = round(f.shape[-2] / size[0])
            if k >= 2:              # a finer tap (stride 4 into stride 8): mean over each cell
                f = F.avg_pool2d(f, k, k, ceil_mode=True)
            # The bias-free 1x1 reduction commutes with the (linear) resampling, so a coarser tap
            # is reduced first and its few reduced channels upsampled: the same map, and on the
            # stride-4 grid 16% less time in the AffinityNet step (upsampling 576 channels and
            # its backward had been 11% of it).
            f = conv(f)
            if f.shape[-2:] != size:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            parts.append(F.elu(f))
        return F.elu(self.head(torch.cat(parts, dim=1)))


class BoundaryNet(nn.Module):
    """IRN's class-boundary branch (Ahn, Cho & Kwak, 2019) on a frozen backbone: each of its
    ``edge_taps`` through a 1x1 conv to ``width`` channels, GroupNorm(4), bilinear upsampling to
    stride 4 and ReLU, as the authors order them; the maps concatenated and a 1x1 conv (with bias)
    to one channel. Output: boundary logits (B, ceil(H/4), ceil(W/4)). The backbone gets no
    gradient and keeps its BN statistics (``train()`` leaves it in eval mode)."""

    def __init__(self, backbone: nn.Module, width: int = 32):
        super().__init__()
        self.backbone = backbone.eval()     # frozen from the start, BN statistics included
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.tap_names = list(backbone.edge_taps)
        self.edges = nn.ModuleList([nn.Sequential(nn.Conv2d(c, width, 1, bias=False),
                                                  nn.GroupNorm(4, width))
                                    for c in backbone.edge_taps.values()])
        self.head = nn.Conv2d(width * len(self.edges), 1, 1, bias=True)

    def new_modules(self) -> list[nn.Module]:
        return [*self.edges, self.head]

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()          # frozen: its BN keeps the trained statistics
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.backbone(x)
        size = (-(-x.shape[-2] // 4), -(-x.shape[-1] // 4))
        parts = []
        for name, edge in zip(self.tap_names, self.edges):
            f = edge(feats[name].detach())
            scale = round(size[0] / f.shape[-2])
            if scale > 1:       # the authors upsample by the stride ratio, then crop
                f = F.interpolate(f, scale_factor=scale, mode="bilinear", align_corners=False)
            parts.append(F.relu(f[..., :size[0], :size[1]]))
        return self.head(torch.cat(parts, dim=1))[:, 0]


class LightSegmenter(nn.Module):
    """A DeepLabV3-style segmenter sized for the small backbone: torchvision's ASPP with 64
    channels and rates (2, 4, 6), then a 3x3 conv and the classifier; logits at input resolution.

    DeepLab's own head (256 channels, rates 12/24/36) is built for 65x65 feature maps; on the
    demo's 16x16 maps its dilated branches read mostly padding, and it cost half of the demo's time
    (13 v. 27 img/s per training step on 2 CPU threads, 128-px batches of 16)."""

    def __init__(self, backbone: nn.Module, num_classes: int, channels: int = 64,
                 rates=(2, 4, 6)):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(
            ASPP(backbone.out_channels, list(rates), channels),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(), nn.Conv2d(channels, num_classes, 1))

    def new_modules(self) -> list[nn.Module]:
        return [self.head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = list(self.backbone(x).values())[-1]
        return F.interpolate(self.head(f), size=x.shape[-2:], mode="bilinear", align_corners=False)


class DeepLabV3(nn.Module):
    """torchvision's DeepLabV3-ResNet50 (output stride 8), logits at input resolution."""

    def __init__(self, num_classes: int, pretrained_backbone: str | None = None):
        super().__init__()
        self.net = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=num_classes,
                                      aux_loss=False)
        if pretrained_backbone:
            load_pretrained(self.net.backbone, pretrained_backbone)

    def new_modules(self) -> list[nn.Module]:
        return [self.net.classifier]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["out"]


def build_classifier(model_cfg, num_classes: int) -> Classifier:
    return Classifier(build_backbone(model_cfg.backbone, model_cfg.pretrained), num_classes,
                      model_cfg.cls_dropout)


def unknown_layers(names, have, backbone: str) -> str | None:
    """The error for ``model.frozen_layers`` names that are not among the backbone's layers
    ``have``, or None when every name is one."""
    unknown = [n for n in names if n not in have]
    return (f"model.frozen_layers: {', '.join(map(repr, unknown))} is not a layer of the "
            f"{backbone} backbone (have {', '.join(have)})" if unknown else None)


def freeze_layers(backbone: nn.Module, names) -> None:
    """Stop training the backbone's child modules ``names`` (``model.frozen_layers``): their
    parameters no longer require grad, so the optimiser and DDP leave them out. Their BN layers
    still follow ``model.freeze_bn``, as in the authors' code."""
    children = dict(backbone.named_children())
    problem = unknown_layers(names, list(children), type(backbone).__name__)
    if problem:
        raise ValueError(problem)
    for n in names:
        for p in children[n].parameters():
            p.requires_grad_(False)


def deeplab_weights(model_cfg) -> str | None:
    """The weights file of DeepLabV3's ResNet-50: ``model.seg_pretrained``, else
    ``model.pretrained`` when that is a ResNet-50 file too, else None (random)."""
    return model_cfg.seg_pretrained or (
        model_cfg.pretrained if model_cfg.backbone == "resnet50" else None)


def build_segmenter(model_cfg, num_classes_with_bg: int) -> nn.Module:
    if model_cfg.segmenter == "deeplabv3_resnet50":
        return DeepLabV3(num_classes_with_bg, deeplab_weights(model_cfg))
    if model_cfg.segmenter == "light":
        return LightSegmenter(build_backbone(model_cfg.backbone, model_cfg.pretrained),
                              num_classes_with_bg)
    raise ValueError(f"model.segmenter: unknown segmenter {model_cfg.segmenter!r} "
                     f"(have light, deeplabv3_resnet50)")


def set_bn_eval(model: nn.Module) -> None:
    """Frozen BN (the authors' setting): running statistics fixed, affine parameters not trained."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
