"""Multi-scale CAM inference (the authors' recipe) and CAM post-processing. Pure tensor code."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .affinity import background_score


def _as_multi_hot(labels, num_classes: int, device) -> torch.Tensor:
    """1-based class ids (list) or a (C,) multi-hot vector -> (C,) float multi-hot."""
    t = torch.as_tensor(labels, device=device)
    if t.dim() == 1 and t.numel() == num_classes and t.dtype in (torch.float32, torch.float64, torch.bool):
        return t.float()
    hot = torch.zeros(num_classes, device=device)
    if t.numel():
        hot[t.long() - 1] = 1.0
    return hot


@torch.inference_mode()
def cam_multiscale_batch(model, images: torch.Tensor, labels: torch.Tensor,
                         scales: Sequence[float] = (1.0, 0.5, 1.5, 2.0), flip: bool = True) -> torch.Tensor:
    """CAMs of a batch of same-size images: images (B, 3, H, W) normalised, labels (B, C) multi-hot.

    Per scale: resize, forward the images (and their mirror images, in the same batch), upsample the
    ReLU class maps to the image size, un-flip, sum over scales and flips; then zero the classes
    absent from each image's label and divide each class by its maximum (+1e-5). Returns (B, C, H, W)
    in [0, 1]. ``model.cams(x)`` must return (B, C, h, w) ReLU class maps.
    """
    b, _, h, w = images.shape
    total = None
    for s in scales:
        x = images if s == 1.0 else F.interpolate(
            images, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear",
            align_corners=False)
        if flip:
            x = torch.cat([x, x.flip(-1)], dim=0)
        cam = F.interpolate(model.cams(x).float(), size=(h, w), mode="bilinear", align_corners=False)
        cam = cam[:b] + cam[b:].flip(-1) if flip else cam
        total = cam if total is None else total + cam
    total = total * labels[:, :, None, None].to(total.dtype)
    return total / (total.amax(dim=(-2, -1), keepdim=True) + 1e-5)


def cam_multiscale(model, image: torch.Tensor, labels, scales: Sequence[float] = (1.0, 0.5, 1.5, 2.0),
                   flip: bool = True) -> torch.Tensor:
    """CAMs of one image (3, H, W); ``labels`` 1-based class ids or a (C,) multi-hot. -> (C, H, W)."""
    num_classes = model.num_classes
    hot = _as_multi_hot(labels, num_classes, image.device)
    return cam_multiscale_batch(model, image[None], hot[None], scales, flip)[0]


def cam_to_label(cams: torch.Tensor, class_ids: Sequence[int], bg_score: float = 0.2) -> torch.Tensor:
    """Segmentation from CAMs alone (how the paper scores CAMs): constant background score, argmax.

    cams (K, H, W) for the classes ``class_ids`` (1-based) -> (H, W) label map."""
    bg = torch.full((1,) + tuple(cams.shape[-2:]), bg_score, dtype=cams.dtype, device=cams.device)
    lut = torch.tensor([0] + list(class_ids), dtype=torch.long, device=cams.device)
    return lut[torch.cat([bg, cams], 0).argmax(0)]


def rw_inputs(cams: torch.Tensor, bg_alpha: float = 16.0) -> torch.Tensor:
    """Maps the walk propagates: background ``(1 - max cam)^bg_alpha`` first, then the given CAMs."""
    return torch.cat([background_score(cams, bg_alpha), cams], dim=0)


def rw_to_label(walked: torch.Tensor, class_ids: Sequence[int]) -> torch.Tensor:
    """Argmax of random-walk output (background first, then ``class_ids``) -> (H, W) label map."""
    lut = torch.tensor([0] + list(class_ids), dtype=torch.long, device=walked.device)
    return lut[walked.argmax(0)]


def distrust_background(label: torch.Tensor, class_ids: Sequence[int], min_fraction: float,
                        ignore: int = 255) -> torch.Tensor:
    """A pseudo label for training a segmenter, with its background set to ``ignore`` when a class
    of the image label covers less than ``min_fraction`` of the labelled pixels.

    The image label says that class is in the picture; a pseudo label that (nearly) lacks it has
    called that object background, so its background is known to be wrong somewhere and is better
    left out of the loss than taught. Its class pixels are kept. label (H, W) int -> same shape."""
    labelled = label != ignore
    n = int(labelled.sum())
    if n == 0 or not class_ids:
        return label
    if min(int((label == c).sum()) for c in class_ids) >= min_fraction * n:
        return label
    return torch.where(label == 0, torch.full_like(label, ignore), label)
