"""A segmenter's class probabilities for one image, at one scale or averaged over several scales and
their horizontal flips (the usual multi-scale test of DeepLab and the paper's segmenters)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .image import pad_to_multiple


def segment_probs(model, x: torch.Tensor, scales: Sequence[float] = (1.0,),
                  flip: bool = False) -> torch.Tensor:
    """Softmax probabilities (C, H, W) of ``model`` on ``x`` (1, 3, H, W, normalised), averaged
    over ``scales`` (each a bilinear resize of the image, zero-padded to a multiple of 8 for the
    stride-8 network, the logits cropped and resized back) and, with ``flip``, over each scale's
    mirror image."""
    h, w = x.shape[-2:]
    total = None
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear",
                                              align_corners=False)
        batch = torch.cat([xs, xs.flip(-1)]) if flip else xs
        sh, sw = xs.shape[-2:]
        logits = model(pad_to_multiple(batch, 8))[..., :sh, :sw].float()
        if (sh, sw) != (h, w):
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        probs = logits.softmax(1)
        if flip:
            probs = torch.cat([probs[:1], probs[1:].flip(-1)])
        total = probs.sum(0) if total is None else total + probs.sum(0)
    return total / (len(scales) * (2 if flip else 1))
