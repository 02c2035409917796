"""``irn_walk`` (method irn): pseudo labels from the CAMs walked on IRN's class boundaries, one
``pseudo.png`` per image at image resolution, as the authors' make_sem_seg_labels: the boundary
map at stride 4 (the logits of the image and of its mirror image averaged, then the sigmoid), the
CAMs brought to that grid, damped by the boundaries and walked (``core.boundary.boundary_walk``:
``D^-1 A^beta`` for ``t`` steps on the sparse pairs within ``radius``), upsampled x4, divided by
their maximum, a constant background score, the argmax (with ``irn_walk.crf``, this project's
addition as for AffinityNet's walk: the dense CRF on those scores first)."""
from __future__ import annotations

import functools
import time

import numpy as np
import torch
import torch.nn.functional as F

from ...core.boundary import boundary_walk, walk_to_label
from ...core.image import normalize, pad_to_multiple
from ...data.shards import encode_mask
from .base import LabelStage, crf_scores, crf_settings, decoded, summary, write


@torch.inference_mode()
def boundary_map(model, image: np.ndarray, device, flip: bool = True) -> torch.Tensor:
    """IRN's class-boundary probabilities (ceil(H/4), ceil(W/4)) of one uint8 image: the network
    on the image zero-padded at the bottom and right (after normalisation: the mean colour) and,
    with ``flip``, on its mirror image padded alike and mirrored back, the logits averaged."""
    x = normalize(torch.from_numpy(image)[None].to(device))
    h4, w4 = -(-x.shape[-2] // 4), -(-x.shape[-1] // 4)
    logits = model(pad_to_multiple(x, 8))[..., :h4, :w4]
    if flip:
        logits = (logits + model(pad_to_multiple(x.flip(-1), 8))[..., :h4, :w4].flip(-1)) / 2
    return torch.sigmoid(logits.float())[0]


@torch.inference_mode()
def walk_image(model, image: np.ndarray, cams: torch.Tensor, class_ids, beta: float = 10.0,
               t: int = 256, radius: int = 5, bg_score: float = 0.25, device="cpu",
               tol: float = 0.0, flip: bool = True, crf: dict | None = None) -> torch.Tensor:
    """One image's pseudo label from its CAMs (C, H, W) at image resolution (normalised per
    class) and IRN's ``model`` (``crf``: the dense CRF's settings, on the walked scores)."""
    h, w = image.shape[:2]
    edge = boundary_map(model, image, device, flip)
    # the CAMs on the boundary grid, each class normalised by its maximum there (the authors'
    # stride-4 CAMs are made at that size from each scale's maps)
    small = F.interpolate(cams[None].to(device), size=edge.shape, mode="area")[0]
    small = small / (small.amax(dim=(-2, -1), keepdim=True) + 1e-5)
    walked = boundary_walk(small[None], edge[None], beta, t, radius, tol)
    up = F.interpolate(walked, scale_factor=4, mode="bilinear", align_corners=False)[0, :, :h, :w]
    refine = None if crf is None else functools.partial(crf_scores, image, crf)
    return walk_to_label(up, class_ids, bg_score, refine)


def irn_walk_shard(model, in_shard, cams_shard, out_shard, beta: float = 10.0, t: int = 256,
                   radius: int = 5, bg_score: float = 0.25, device="cpu", tol: float = 0.0,
                   flip: bool = True, crf: dict | None = None) -> dict:
    """Pseudo labels (``pseudo.png``) of every image of a shard."""
    t0, failed, out, io = time.monotonic(), [], [], {}
    for s in decoded(in_shard, cams_shard, label_fields=("cam",), failed=failed, io=io):
        cams = torch.from_numpy(s["cam"].astype(np.float32))
        lab = walk_image(model, s["image"], cams, s["cls"], beta, t, radius, bg_score, device,
                         tol, flip, crf)
        out.append({"__key__": s["key"],
                    "pseudo.png": encode_mask(lab.cpu().numpy().astype(np.uint8))})
    write(out_shard, out, io)
    return summary(in_shard, out_shard, t0, len(out), failed, io)


class IrnWalk(LabelStage):
    name, reads, field = "irn_walk", ("cams",), "pseudo"
    export_needs_image = False

    def process(self, ctx, in_shard, inputs, out_shard, batch_size=None):
        r = ctx.cfg.irn_walk
        return irn_walk_shard(ctx.model, in_shard, inputs[0], out_shard, r.beta, r.t, r.radius,
                              r.bg_score, ctx.device, r.tol, r.flip,
                              crf_settings(ctx.cfg, r.crf and ctx.crf, "irn_walk"))

    def describe(self, cfg, size):
        return (f"{cfg.model.backbone} IRN boundary + walk t {cfg.irn_walk.t} at stride 4"
                f"{' + CRF' if cfg.irn_walk.crf else ''}, {size[1]}x{size[0]}")


STAGE = IrnWalk()
