"""The paper's augmentation of a training sample (:class:`Augment`): random resize of the long
side, flip, colour jitter and crop, on the image and its label map jointly, the draws from the
caller's seeded generator (``train_data.py``: an epoch's batches are a pure function of the seed).
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Imported here, in the trainer, not in the loader workers: a worker starts afresh every epoch and
# importing torchvision there took 2.3 s each time.
from torchvision.transforms import functional as TF

from ..core.affinity import cell_grid
from ..core.image import normalize

IGNORE = 255        # the label of pixels outside the image, and of ignored ones


class Augment:
    """The paper's augmentation on an image and (optionally) a label map, jointly.

    ``resize_long``: the long side is resized to a random length in this range (None: keep);
    horizontal flip; colour jitter (brightness, contrast, saturation, hue) on the image only; random
    crop of ``crop`` pixels, padding with 0 (image, after normalisation) and 255 (label).

    ``label_stride`` > 1: the label is on the image's cell grid of that stride (AffinityNet's
    labels, ``core.affinity.cell_grid``). The image is then placed and cropped on whole cells, so
    the crop's cells are the image's cells (its label cells, unchanged; outside the image 255),
    and flipped after the crop, whose width is whole cells: what the authors' trainer sees after
    its crop, flip and ``AvgPool2d(8)`` of the score maps, for crops on the cell grid. With
    ``resize_long`` (the authors' AffinityNet training has none) the cell labels are resized to
    the new image's grid by nearest neighbour.
    """

    def __init__(self, crop: int, resize_long=None, jitter=(0.3, 0.3, 0.3, 0.1), flip=True,
                 label_stride: int = 1):
        if crop % label_stride:
            raise ValueError(f"crop {crop} is not a multiple of the label stride {label_stride}")
        self.crop, self.resize_long, self.flip = crop, resize_long, flip
        self.jitter = tuple(jitter) if jitter and any(jitter) else None
        self.label_stride = label_stride

    def draw(self, height: int, width: int, rng: random.Random) -> dict:
        """Every random choice for an image of that size: the size it is resized to, the flip,
        the jitter's operations, where the image lands on the canvas (``oy, ox``) and where the
        crop starts on it (``cy, cx``); multiples of ``label_stride``."""
        size = (height, width)
        if self.resize_long:
            s = rng.randint(*self.resize_long) / max(height, width)
            size = (max(1, round(height * s)), max(1, round(width * s)))
        flip = bool(self.flip and rng.random() < 0.5)
        ops = self._draw_jitter(rng) if self.jitter is not None else []
        k = self.label_stride
        ch, cw = max(self.crop, size[0]), max(self.crop, size[1])
        oy, ox = (k * rng.randint(0, (ch - size[0]) // k), k * rng.randint(0, (cw - size[1]) // k))
        cy, cx = k * rng.randint(0, (ch - self.crop) // k), k * rng.randint(0, (cw - self.crop) // k)
        return {"size": size, "flip": flip, "jitter": ops, "oy": oy, "ox": ox, "cy": cy, "cx": cx}

    def __call__(self, image: np.ndarray, label: np.ndarray | None = None,
                 rng: random.Random | None = None):
        """``rng``: where every random choice is drawn from (a fresh one when None)."""
        img = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)  # uint8 (3, H, W)
        lab = torch.from_numpy(label.astype(np.int64))[None] if label is not None else None
        k = self.label_stride
        if lab is not None and k > 1 and tuple(lab.shape[-2:]) != cell_grid(*img.shape[-2:], k):
            raise ValueError(f"label of shape {tuple(lab.shape[-2:])} is not the stride-{k} cell "
                             f"grid {cell_grid(*img.shape[-2:], k)} of its {tuple(img.shape[-2:])} "
                             f"image")
        d = self.draw(*img.shape[-2:], rng or random.Random())
        if d["size"] != tuple(img.shape[-2:]):
            img = F.interpolate(img[None].float(), size=d["size"], mode="bilinear",
                                align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
            if lab is not None:
                lab = F.interpolate(lab[None].float(), size=cell_grid(*d["size"], k),
                                    mode="nearest")[0].long()
        flip_now = d["flip"] and k == 1     # on the cell grid: after the crop (see the docstring)
        if flip_now:
            img = img.flip(-1)
            lab = lab.flip(-1) if lab is not None else None
        if d["jitter"]:
            img = self._jitter(img, d["jitter"])
        x = normalize(img[None])[0]
        h, w = x.shape[-2:]
        ch, cw = max(self.crop, h), max(self.crop, w)
        oy, ox, cy, cx = d["oy"], d["ox"], d["cy"], d["cx"]
        canvas = x.new_zeros(3, ch, cw)
        canvas[:, oy:oy + h, ox:ox + w] = x
        x = canvas[:, cy:cy + self.crop, cx:cx + self.crop]
        if lab is None:
            return (x.flip(-1) if d["flip"] and not flip_now else x), None
        gh, gw = -(-ch // k), -(-cw // k)
        lcanvas = torch.full((1, gh, gw), IGNORE, dtype=torch.long)
        lcanvas[:, oy // k:oy // k + lab.shape[-2], ox // k:ox // k + lab.shape[-1]] = lab
        y = lcanvas[0, cy // k:(cy + self.crop) // k, cx // k:(cx + self.crop) // k]
        if d["flip"] and not flip_now:
            x, y = x.flip(-1), y.flip(-1)
        return x, y

    def _draw_jitter(self, rng: random.Random) -> list:
        """The jitter's (operation, factor) pairs in the order they are applied."""
        b, c, s, h = self.jitter
        ops = []
        if b:
            ops.append((TF.adjust_brightness, rng.uniform(max(0.0, 1 - b), 1 + b)))
        if c:
            ops.append((TF.adjust_contrast, rng.uniform(max(0.0, 1 - c), 1 + c)))
        if s:
            ops.append((TF.adjust_saturation, rng.uniform(max(0.0, 1 - s), 1 + s)))
        if h:
            ops.append((TF.adjust_hue, rng.uniform(-h, h)))
        rng.shuffle(ops)
        return ops

    def _jitter(self, img: torch.Tensor, ops: list) -> torch.Tensor:
        """torchvision's ColorJitter, with its factors and order drawn by :meth:`draw`, applied to a
        PIL image as in the authors' code: the tensor path's hue shift (an RGB -> HSV -> RGB round
        trip in float ops) cost 14.5 ms of the 15.5 ms a 128-px sample took to augment, PIL's 1.3 ms,
        and the loader's one worker could not keep up with a bf16 training step."""
        pil = Image.fromarray(img.permute(1, 2, 0).numpy())
        for fn, f in ops:
            pil = fn(pil, f)
        return torch.from_numpy(np.array(pil, copy=True)).permute(2, 0, 1)
