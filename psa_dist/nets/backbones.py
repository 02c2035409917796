"""Backbones with output stride 8 and named multi-level feature taps.

Every backbone maps (B, 3, H, W) to a dict of feature maps whose last one is at stride 8
(``ceil(H / 8)`` × ``ceil(W / 8)``; earlier taps may be finer), and declares ``taps`` (name ->
channels) for AffinityNet, ``edge_taps`` for IRN's boundary branch, and ``out_channels`` for the
last one, which the classifier and segmenter use.

* ``small``: a compact residual network that trains on 2 CPU cores, for the embedded demo.
* ``resnet50``: torchvision's ResNet-50 with the last two stages dilated (stride 8).
* ``resnet38``: the wide ResNet-38 of the paper's best results (Wu et al.), dilated as in the
  authors' code (stage 5 dilation 2, stages 6-7 dilation 4).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from .mxnet_params import psa_names, read_params

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- small
class _Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, dilation, dilation, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, dilation, dilation, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.skip = None if cin == cout and stride == 1 else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        return F.relu(y + (x if self.skip is None else self.skip(x)))


class SmallNet(nn.Module):
    """A small residual network (about 1.2 M parameters): 3 stride-2 stages then two dilated ones."""

    def __init__(self, widths=(32, 64, 128, 192, 256), dilations=(1, 2)):
        super().__init__()
        w = widths
        self.stem = nn.Sequential(nn.Conv2d(3, w[0], 3, 2, 1, bias=False), nn.BatchNorm2d(w[0]),
                                  nn.ReLU(inplace=True))
        self.layer1 = _Basic(w[0], w[1], stride=2)
        self.layer2 = _Basic(w[1], w[2], stride=2)
        self.layer3 = _Basic(w[2], w[3], dilation=dilations[0])
        self.layer4 = _Basic(w[3], w[4], dilation=dilations[1])
        # layer1 (stride 4) is tapped too: trained from scratch, the deep taps know classes but
        # little about surfaces; the shallow one gives AffinityNet colour and texture coherence to
        # follow (a pretrained backbone has this in its deep features). AffinityNet brings every
        # tap to its own output grid (stride 8, or 4 with model.aff_stride).
        self.taps = {"layer1": w[1], "layer2": w[2], "layer3": w[3], "layer4": w[4]}
        self.edge_taps = dict(self.taps)         # IRN's boundary branch reads the same
        self.aff_dims = (32, 64, 128, 256)
        self.out_channels = w[4]

    def forward(self, x):
        f1 = self.layer1(self.stem(x))
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        return {"layer1": f1, "layer2": f2, "layer3": f3, "layer4": f4}


# ----------------------------------------------------------------------------- resnet50
class ResNet50(nn.Module):
    """torchvision ResNet-50, stages 3 and 4 dilated (replace_stride_with_dilation) for stride 8."""

    def __init__(self):
        super().__init__()
        net = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.taps = {"layer2": 512, "layer3": 1024, "layer4": 2048}
        # IRN's boundary branch reads every stage, as the authors' (their last two at stride 16)
        self.edge_taps = {"stem": 64, "layer1": 256, **self.taps}
        self.aff_dims = (64, 128, 256)
        self.out_channels = 2048

    def forward(self, x):
        f0 = self.stem(x)
        f1 = self.layer1(f0)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return {"stem": f0, "layer1": f1, "layer2": f2, "layer3": f3, "layer4": self.layer4(f3)}


# ----------------------------------------------------------------------------- resnet38
class _PreAct(nn.Module):
    """Pre-activation residual block of ResNet-38 (two 3×3 convs)."""

    def __init__(self, cin, cmid, cout, stride=1, dilation=1, first_dilation=None):
        super().__init__()
        fd = dilation if first_dilation is None else first_dilation
        self.bn_a = nn.BatchNorm2d(cin)
        self.conv_a = nn.Conv2d(cin, cmid, 3, stride, fd, fd, bias=False)
        self.bn_b = nn.BatchNorm2d(cmid)
        self.conv_b = nn.Conv2d(cmid, cout, 3, 1, dilation, dilation, bias=False)
        self.proj = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x, keep_act: bool = False):
        act = F.relu(self.bn_a(x))
        skip = x if self.proj is None else self.proj(act)
        y = self.conv_b(F.relu(self.bn_b(self.conv_a(act))))
        return (y + skip, act) if keep_act else y + skip


class _PreActBottleneck(nn.Module):
    """Pre-activation bottleneck block of ResNet-38 stages 6 and 7 (1×1, 3×3, 1×1; dropout inside)."""

    def __init__(self, cin, cout, stride=1, dilation=1, dropout=0.0):
        super().__init__()
        self.bn_a = nn.BatchNorm2d(cin)
        self.conv_a = nn.Conv2d(cin, cout // 4, 1, stride, bias=False)
        self.bn_b = nn.BatchNorm2d(cout // 4)
        self.drop_b = nn.Dropout2d(dropout)
        self.conv_b = nn.Conv2d(cout // 4, cout // 2, 3, 1, dilation, dilation, bias=False)
        self.bn_c = nn.BatchNorm2d(cout // 2)
        self.drop_c = nn.Dropout2d(dropout)
        self.conv_c = nn.Conv2d(cout // 2, cout, 1, 1, bias=False)
        self.proj = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        act = F.relu(self.bn_a(x))
        y = self.conv_b(self.drop_b(F.relu(self.bn_b(self.conv_a(act)))))
        y = self.conv_c(self.drop_c(F.relu(self.bn_c(y))))
        return y + self.proj(act)


class ResNet38(nn.Module):
    """Wide ResNet-38 (Wu, Shen & van den Hengel), output stride 8 as in the AffinityNet code.

    Taps: ``conv4`` (512, end of stage 4), ``conv5`` (1024, end of stage 5), ``conv6`` (4096, after
    stage 7 and its final BN + ReLU), which AffinityNet reduces to 64 / 128 / 256 channels.
    """

    def __init__(self):
        super().__init__()
        self.conv1a = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.b2 = nn.ModuleList([_PreAct(64, 128, 128, stride=2), _PreAct(128, 128, 128),
                                 _PreAct(128, 128, 128)])
        self.b3 = nn.ModuleList([_PreAct(128, 256, 256, stride=2), _PreAct(256, 256, 256),
                                 _PreAct(256, 256, 256)])
        self.b4 = nn.ModuleList([_PreAct(256, 512, 512, stride=2)] +
                                [_PreAct(512, 512, 512) for _ in range(5)])
        self.b5 = nn.ModuleList([_PreAct(512, 512, 1024, dilation=2, first_dilation=1),
                                 _PreAct(1024, 512, 1024, dilation=2),
                                 _PreAct(1024, 512, 1024, dilation=2)])
        self.b6 = _PreActBottleneck(1024, 2048, dilation=4, dropout=0.3)
        self.b7 = _PreActBottleneck(2048, 4096, dilation=4, dropout=0.5)
        self.bn7 = nn.BatchNorm2d(4096)
        self.taps = {"conv4": 512, "conv5": 1024, "conv6": 4096}
        self.edge_taps = {"conv3": 256, **self.taps}     # conv3: stage 3's output, stride 4
        self.aff_dims = (64, 128, 256)          # 448 channels, as the paper
        self.out_channels = 4096

    def forward(self, x):
        x = self.conv1a(x)
        for blk in (*self.b2, *self.b3):
            x = blk(x)
        conv3 = x
        for blk in self.b4:
            x = blk(x)
        x, conv4 = self.b5[0](x, keep_act=True)   # conv4: stage-4 output after its BN + ReLU
        for blk in self.b5[1:]:
            x = blk(x)
        conv5 = F.relu(self.b6.bn_a(x))
        x = self.b7(self.b6(x))
        conv6 = F.relu(self.bn7(x))
        return {"conv3": conv3, "conv4": conv4, "conv5": conv5, "conv6": conv6}


BACKBONES = {"small": SmallNet, "resnet50": ResNet50, "resnet38": ResNet38}


def layer_names(name: str) -> list[str]:
    """The child modules of backbone ``name`` (what ``model.frozen_layers`` names), read from an
    instance on the meta device: no weights are allocated."""
    with torch.device("meta"):
        return [n for n, _ in BACKBONES[name]().named_children()]


def build_backbone(name: str, pretrained: str | None = None) -> nn.Module:
    """A backbone by name; ``pretrained`` is a local state-dict file (missing file: clear error)."""
    if name not in BACKBONES:
        raise ValueError(f"model.backbone: unknown backbone {name!r} (have {sorted(BACKBONES)})")
    net = BACKBONES[name]()
    if pretrained:
        load_pretrained(net, pretrained)
    return net


# The authors' ResNet-38 (psa's network/resnet38d.py, and the ImageNet weights its
# convert_mxnet_to_torch writes) names blocks b2, b2_1, b2_2, ..., b5_2, b6, b7 and their layers
# after the MXNet original; ResNet38 above uses module lists and short names.
_PSA_LAYERS = {"bn_branch2a": "bn_a", "conv_branch2a": "conv_a", "bn_branch2b1": "bn_b",
               "conv_branch2b1": "conv_b", "bn_branch2b2": "bn_c", "conv_branch2b2": "conv_c",
               "conv_branch1": "proj"}


def is_psa_resnet38(state: dict) -> bool:
    """Whether ``state`` uses the authors' ResNet-38 layer names."""
    return any(part in _PSA_LAYERS for k in state for part in str(k).split("."))


def from_psa_resnet38(state: dict) -> dict:
    """A state dict in the authors' ResNet-38 names (``b2_1.conv_branch2a.weight``, with or
    without DataParallel's ``module.``) renamed to :class:`ResNet38`'s (``b2.1.conv_a.weight``).
    Keys of no backbone layer (the classifier's ``fc8``, ImageNet's ``linear1000``, AffinityNet's
    heads) are left out."""
    out = {}
    for key, value in state.items():
        k = key[len("module."):] if key.startswith("module.") else key
        head, _, rest = k.partition(".")
        if head in ("conv1a", "bn7"):
            out[k] = value
            continue
        m = re.fullmatch(r"b([2-7])(?:_([1-9]))?", head)
        layer, _, param = rest.partition(".")
        if not m or layer not in _PSA_LAYERS:
            continue
        stage, index = int(m[1]), int(m[2] or 0)
        if stage >= 6 and index:
            continue                        # stages 6 and 7 have one block each
        block = f"b{stage}" if stage >= 6 else f"b{stage}.{index}"
        out[f"{block}.{_PSA_LAYERS[layer]}.{param}"] = value
    return out


def load_pretrained(net: nn.Module, path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model.pretrained: weights file not found: {p}")
    if p.suffix == ".params":           # the authors' MXNet ImageNet file, read without mxnet
        if not isinstance(net, ResNet38):
            raise ValueError(f"model.pretrained: {p} is an MXNet .params file, read for the "
                             f"resnet38 backbone only")
        state = {k: torch.from_numpy(v) for k, v in psa_names(read_params(p)).items()}
    else:
        state = torch.load(p, map_location="cpu", weights_only=True)
        state = state.get("model", state) if isinstance(state, dict) else state
    if isinstance(net, ResNet38) and isinstance(state, dict) and is_psa_resnet38(state):
        log.warning("%s: the authors' ResNet-38 key names, renamed to psa_dist's", p)
        state = from_psa_resnet38(state)
    missing, unexpected = net.load_state_dict(state, strict=False)
    # BN's num_batches_tracked counters carry no weights: a file that matches only those (or a
    # few stray names) is the wrong file, and training would silently start from random weights.
    real = [k for k in net.state_dict() if not k.endswith("num_batches_tracked")]
    loaded = len([k for k in real if k not in set(missing)])
    if loaded < len(real) / 2:
        raise ValueError(f"model.pretrained: {p} matches {loaded} of the {len(real)} weight tensors "
                         f"of this {type(net).__name__} (e.g. missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}): wrong file or naming?")
    log.warning("loaded %d tensors from %s (%d missing, %d unexpected)", loaded, p, len(missing),
                len(unexpected))
