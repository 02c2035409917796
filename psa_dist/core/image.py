"""Image tensors as the networks see them: normalised with ImageNet statistics, zero-padded to a
multiple of the output stride (and the outputs cropped back to the image)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# ImageNet statistics: images are normalised with these everywhere (pretrained or not).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) or (B, 3, H, W) uint8 -> (B, 3, H, W) float normalised."""
    x = images_uint8
    if x.shape[-1] == 3 and x.dim() == 4:
        x = x.permute(0, 3, 1, 2)
    x = x.float() / 255.0
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def pad_to_multiple(x: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """``x`` (..., H, W) zero-padded at the bottom and right to a multiple of ``multiple``: the
    grid of every stride-8 network lines up with the image's top-left pixel, and cropping the
    output to (H, W) undoes the padding."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, (-w) % multiple, 0, (-h) % multiple))
