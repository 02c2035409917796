"""``random_walk``: pseudo labels from the CAMs and AffinityNet's features
(``core.pseudo_labels.walk_labels``: the sparse walk ``T = D^-1 W^beta`` for ``t`` steps), one
``pseudo.png`` per image at image resolution, ``batch_size`` images walked together."""
from __future__ import annotations

import functools
import time

import numpy as np
import torch

from ...core.image import normalize, pad_to_multiple
from ...core.pseudo_labels import walk_labels
from ...data.shards import encode_mask
from .base import LabelStage, crf_scores, crf_settings, decoded, summary, write


@torch.inference_mode()
def walk_images(aff_model, images: list, cams: list, class_ids: list, beta=8.0, t=256, radius=5,
                bg_alpha=16.0, device="cpu", tol: float = 0.0, crf: dict | None = None) -> list:
    """Pseudo labels of several images (uint8 (H, W, 3) arrays with their CAMs): AffinityNet's
    features of each image zero-padded to a multiple of 8, then :func:`walk_labels` of the batch
    (``crf``: the dense CRF's settings, on each image's walked maps)."""
    feats = [aff_model(pad_to_multiple(normalize(torch.from_numpy(im)[None].to(device)), 8))[0]
             for im in images]
    refine = [None if crf is None else functools.partial(crf_scores, im, crf) for im in images]
    return walk_labels(feats, [c.to(device) for c in cams], class_ids, beta, t, radius, bg_alpha,
                       tol, refine)


def rw_shard(aff_model, in_shard, cams_shard, out_shard, beta=8.0, t=256, radius=5,
             bg_alpha=16.0, device="cpu", batch_size: int = 8, tol: float = 0.0,
             crf: dict | None = None) -> dict:
    """Random-walk pseudo labels (``pseudo.png``, image resolution) for every image of a shard,
    walked ``batch_size`` images at a time."""
    t0, failed, out, io = time.monotonic(), [], [], {}
    batch: list = []

    def flush():
        labels = walk_images(aff_model, [s["image"] for s in batch],
                             [torch.from_numpy(s["cam"].astype(np.float32)) for s in batch],
                             [s["cls"] for s in batch], beta, t, radius, bg_alpha, device, tol,
                             crf)
        for s, lab in zip(batch, labels):
            out.append({"__key__": s["key"],
                        "pseudo.png": encode_mask(lab.cpu().numpy().astype(np.uint8))})
        batch.clear()

    for s in decoded(in_shard, cams_shard, label_fields=("cam",), failed=failed, io=io):
        batch.append(s)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    write(out_shard, out, io)
    return summary(in_shard, out_shard, t0, len(out), failed, io)


class RandomWalk(LabelStage):
    name, reads, field = "random_walk", ("cams",), "pseudo"
    export_needs_image = False

    def process(self, ctx, in_shard, inputs, out_shard, batch_size=None):
        r = ctx.cfg.random_walk
        return rw_shard(ctx.model, in_shard, inputs[0], out_shard, r.beta, r.t, r.radius,
                        r.bg_alpha, ctx.device, batch_size or r.batch_size, r.tol,
                        crf_settings(ctx.cfg, r.crf and ctx.crf))

    def config_batch(self, cfg):
        return cfg.random_walk.batch_size

    def describe(self, cfg, size):
        m = cfg.model
        return (f"{m.backbone} AffinityNet stride {m.aff_stride} + walk t {cfg.random_walk.t}, "
                f"{size[1]}x{size[0]}")


STAGE = RandomWalk()
