"""``cams``: multi-scale CAMs of the train split from the trained classifier
(``core.cam.cam_multiscale_batch``), one ``cam.npy`` per image (float16, its classes' maps at image
resolution). On a CPU the classifier's forward runs in bf16 only where timing it says that is faster
(``util/precision.py``)."""
from __future__ import annotations

import time

import numpy as np
import torch

from ...core.cam import cam_multiscale_batch
from ...core.image import normalize
from ...data.shards import encode_json, encode_npy
from ...util.precision import autocast, choose_for_model
from .base import LabelStage, ShardContext, decoded, summary, write


def timing_shape(cfg) -> tuple:
    """The batch the CAM stage's precision is timed on (``bench precision`` times the same)."""
    size = cfg.train_cls.crop_size or 320
    return (cfg.cams.batch_size, 3, size, size)


@torch.inference_mode()
def cam_shard(model, in_shard, out_shard, num_classes: int, scales=(1.0, 0.5, 1.5, 2.0),
              flip: bool = True, device="cpu", batch_size: int = 8, amp=None) -> dict:
    """Multi-scale CAMs of every image; ``cam.npy`` float16 (K, H, W) for the K classes in
    ``cls.json`` (in that order), at image resolution. ``amp``: the autocast dtype of the
    classifier's forward (None: float32); the maps are summed and normalised in float32."""
    t0, failed, out, io = time.monotonic(), [], [], {}
    groups: dict[tuple, list[dict]] = {}     # images of one size, batched together (VOC / COCO
    order: dict[str, int] = {}               # sizes vary, so neighbours rarely match)
    batches = 0

    def flush(batch: list[dict]) -> None:
        nonlocal batches
        if not batch:
            return
        batches += 1
        imgs = normalize(torch.from_numpy(np.stack([s["image"] for s in batch])).to(device))
        hot = torch.zeros(len(batch), num_classes, device=device)
        for i, s in enumerate(batch):
            hot[i, torch.tensor(s["cls"], dtype=torch.long) - 1] = 1
        with autocast(device, amp):
            cams = cam_multiscale_batch(model, imgs, hot, scales, flip).cpu()
        for s, cam in zip(batch, cams):
            keep = torch.tensor(s["cls"], dtype=torch.long) - 1
            out.append({"__key__": s["key"], "cls.json": encode_json(s["cls"]),
                        "cam.npy": encode_npy(cam[keep].numpy())})
        batch.clear()

    for s in decoded(in_shard, failed=failed, io=io):
        order[s["key"]] = len(order)
        group = groups.setdefault(s["image"].shape, [])
        group.append(s)
        if len(group) >= batch_size:
            flush(group)
    for group in groups.values():
        flush(group)
    out.sort(key=lambda r: order[r["__key__"]])      # the input shard's order
    write(out_shard, out, io)
    return {**summary(in_shard, out_shard, t0, len(out), failed, io), "batches": batches}


class Cams(LabelStage):
    name, field, export_array = "cams", "cam", True

    def choose_precision(self, ctx: ShardContext):
        # one process of a machine times, under a lock, the others read its cached timing; a
        # batch of cams.batch_size images at the training crop
        return choose_for_model(ctx.cfg.cams.amp, ctx.device, "cams.amp", ctx.model,
                                timing_shape(ctx.cfg), train=False, key="cams")

    def process(self, ctx, in_shard, inputs, out_shard, batch_size=None):
        c = ctx.cfg.cams
        return cam_shard(ctx.model, in_shard, out_shard, ctx.num_classes, tuple(c.scales), c.flip,
                         ctx.device, batch_size or c.batch_size, ctx.dtype)

    def config_batch(self, cfg):
        return cfg.cams.batch_size

    def describe(self, cfg, size):
        return (f"{cfg.model.backbone}, {size[1]}x{size[0]}, scales {list(cfg.cams.scales)}"
                f"{' + flip' if cfg.cams.flip else ''}")


STAGE = Cams()
