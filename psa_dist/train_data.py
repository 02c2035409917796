"""Training data: WebDataset pipelines over shards (optionally joined with a stage's label shards).

A training set is a list of shard *groups*: the dataset shard and, for AffinityNet and the segmenter,
the label shard a stage wrote for it (same keys, same order). Groups are split across nodes (DDP
ranks) and loader workers by WebDataset, shuffled in a buffer, decoded, augmented as the paper does
(random resize of the long side, flip, colour jitter, crop) and batched. ``with_epoch`` makes every
rank run the same number of steps, so DDP never waits on a rank with fewer samples.
"""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds

from .models import normalize
from .shards import SampleError, decode_sample, iter_joined

IGNORE = 255


def joined_samples(groups, fields=("image", "cls")):
    """Yield decoded samples from shard groups ``{"url": dataset shard, "labels": label shard?}``.

    Label-shard fields (``aff``, ``pseudo``) are joined by key (:func:`iter_joined`). An
    undecodable sample is reported and skipped (training goes on), never silently.
    """
    own = [f for f in fields if f in ("image", "cls", "mask", "meta")]
    extra = [f for f in fields if f in ("aff", "pseudo")]
    for g in groups:
        for raw, labs in iter_joined(g["url"], *([g["labels"]] if g.get("labels") else [])):
            try:
                s = decode_sample(raw, own)
                for lab in labs:
                    s.update({k: v for k, v in decode_sample(lab, extra).items() if k != "key"})
            except SampleError as e:
                print(f"[data] skipping undecodable sample: {e}", flush=True)
                continue
            yield s


class Augment:
    """The paper's augmentation on an image and (optionally) a label map, jointly.

    ``resize_long``: the long side is resized to a random length in this range (None: keep);
    horizontal flip; colour jitter (brightness, contrast, saturation, hue) on the image only; random
    crop of ``crop`` pixels, padding with 0 (image, after normalisation) and 255 (label).
    """

    def __init__(self, crop: int, resize_long=None, jitter=(0.3, 0.3, 0.3, 0.1), flip=True):
        self.crop, self.resize_long, self.flip = crop, resize_long, flip
        self.jitter = None
        if jitter and any(jitter):
            from torchvision.transforms import ColorJitter
            self.jitter = ColorJitter(*jitter)

    def __call__(self, image: np.ndarray, label: np.ndarray | None = None):
        img = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)  # uint8 (3, H, W)
        lab = torch.from_numpy(label.astype(np.int64))[None] if label is not None else None
        h, w = img.shape[-2:]
        if self.resize_long:
            target = random.randint(*self.resize_long)
            s = target / max(h, w)
            size = (max(1, round(h * s)), max(1, round(w * s)))
            img = F.interpolate(img[None].float(), size=size, mode="bilinear", align_corners=False)[0]
            img = img.round().clamp(0, 255).to(torch.uint8)
            if lab is not None:
                lab = F.interpolate(lab[None].float(), size=size, mode="nearest")[0].long()
        if self.flip and random.random() < 0.5:
            img = img.flip(-1)
            lab = lab.flip(-1) if lab is not None else None
        if self.jitter is not None:
            img = self.jitter(img)
        x = normalize(img[None])[0]
        h, w = x.shape[-2:]
        ch, cw = max(self.crop, h), max(self.crop, w)
        oy, ox = random.randint(0, ch - h), random.randint(0, cw - w)   # where the image lands
        canvas = x.new_zeros(3, ch, cw)
        canvas[:, oy:oy + h, ox:ox + w] = x
        lcanvas = None
        if lab is not None:
            lcanvas = torch.full((1, ch, cw), IGNORE, dtype=torch.long)
            lcanvas[:, oy:oy + h, ox:ox + w] = lab
        cy, cx = random.randint(0, ch - self.crop), random.randint(0, cw - self.crop)
        x = canvas[:, cy:cy + self.crop, cx:cx + self.crop]
        if lcanvas is None:
            return x, None
        return x, lcanvas[0, cy:cy + self.crop, cx:cx + self.crop]


class ToTraining:
    """Decoded sample -> (image tensor, target) for one of the three trainers."""

    def __init__(self, kind: str, num_classes: int, augment: Augment):
        self.kind, self.num_classes, self.augment = kind, num_classes, augment

    def __call__(self, s: dict):
        if self.kind == "cls":
            x, _ = self.augment(s["image"])
            y = torch.zeros(self.num_classes)
            y[torch.tensor(s["cls"], dtype=torch.long) - 1] = 1.0
            return x, y
        field = {"aff": "aff", "seg": "pseudo", "seg_full": "mask"}[self.kind]
        if field not in s:
            raise SampleError(f"sample {s['key']!r} has no {field!r} field for {self.kind} training")
        x, y = self.augment(s["image"], s[field])
        return x, y


def _groups(urls: Sequence, label_urls: Sequence | None):
    if label_urls is not None and len(label_urls) != len(urls):
        raise ValueError(f"{len(urls)} dataset shards but {len(label_urls)} label shards")
    return [{"url": str(u), "labels": str(label_urls[i]) if label_urls else None}
            for i, u in enumerate(urls)]


def make_train_loader(kind: str, urls: Sequence, label_urls: Sequence | None, num_classes: int,
                      train_cfg, num_samples: int, world_size: int = 1, seed: int = 0):
    """A WebLoader yielding (images, targets) batches; ``len`` = steps per epoch on every rank."""
    fields = {"cls": ("image", "cls"), "aff": ("image", "aff"), "seg": ("image", "pseudo"),
              "seg_full": ("image", "mask")}[kind]
    aug = Augment(train_cfg.crop_size, tuple(train_cfg.resize_long) if train_cfg.resize_long else None,
                  tuple(train_cfg.color_jitter))
    groups = _groups(urls, label_urls)
    buf = max(1, min(1000, num_samples // (4 * max(world_size, 1))))
    pipeline = wds.DataPipeline(
        _ShuffledGroups(groups, seed),      # same order on every rank and worker, then split:
        wds.split_by_node,                  # ranks and workers take disjoint shard groups
        wds.split_by_worker,
        lambda src: joined_samples(src, fields),
        # A buffer larger than a rank's share would hold several passes over the data and repeat
        # samples within an epoch; a quarter of the share keeps passes apart.
        wds.shuffle(buf, initial=buf, rng=random.Random(seed)),
        wds.map(ToTraining(kind, num_classes, aug)),
        wds.batched(train_cfg.batch_size, partial=False),
    )
    workers = train_cfg.num_workers
    steps = max(1, num_samples // (train_cfg.batch_size * max(world_size, 1)))
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=workers,
                           persistent_workers=workers > 0)
    return EpochLoader(loader.with_epoch(steps), steps)


class EpochLoader:
    """An endless WebLoader cut into epochs of exactly ``steps`` batches (the same on every rank)."""

    def __init__(self, loader, steps: int):
        self.loader, self.steps = loader, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return iter(self.loader)


class _ShuffledGroups(torch.utils.data.IterableDataset):
    """Single-process shard source: every shard group once per epoch, in a fresh random order."""

    def __init__(self, groups, seed):
        self.groups, self.seed, self.epoch = groups, seed, 0

    def __iter__(self):
        order = list(self.groups)
        random.Random(self.seed + self.epoch).shuffle(order)
        self.epoch += 1
        while True:  # repeat: with_epoch cuts the stream into equal epochs
            yield from order
            random.Random(self.seed + self.epoch).shuffle(order)
            self.epoch += 1
