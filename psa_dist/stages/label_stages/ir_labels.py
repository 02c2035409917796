"""``ir_labels`` (method irn): IRN's inter-pixel relation labels from the CAMs
(``core.boundary.confident_labels`` at ``fg_thres``/``bg_thres``, the dense CRF on each hard label
map with ``crf``), one ``ir.png`` per image at image resolution: a class where the CAMs are
confident of it, background where they are confident of none, 255 between. CPU work."""
from __future__ import annotations

import time

import numpy as np
import torch

from ...core.boundary import confident_labels
from ...core.crf import crf_labels
from ...data.shards import encode_mask
from .base import LabelStage, decoded, summary, write


def ir_label_shard(in_shard, cams_shard, out_shard, fg_thres: float = 0.30,
                   bg_thres: float = 0.05, crf: dict | None = None) -> dict:
    """Relation labels (``ir.png``) of every image of a shard from its CAMs; ``crf``: the dense
    CRF's settings (``crf_labels``' keywords), or None for the thresholds' argmax alone."""
    t0, failed, out, io = time.monotonic(), [], [], {}
    for s in decoded(in_shard, cams_shard, label_fields=("cam",), failed=failed, io=io):
        cams = torch.from_numpy(s["cam"].astype(np.float32))
        image = s["image"]
        refine = None if crf is None else (lambda lab, n: crf_labels(image, lab, n, **crf))
        lab = confident_labels(cams, s["cls"], fg_thres, bg_thres, refine)
        out.append({"__key__": s["key"], "ir.png": encode_mask(lab.numpy().astype(np.uint8))})
    write(out_shard, out, io)
    return summary(in_shard, out_shard, t0, len(out), failed, io)


def ir_crf_settings(cfg) -> dict | None:
    c = cfg.ir_labels
    if not c.crf:
        return None
    return {"iters": c.crf_iters, "gt_prob": c.crf_gt_prob, "gauss_sxy": c.crf_gauss_sxy,
            "gauss_compat": c.crf_gauss_compat, "bi_sxy": c.crf_bi_sxy, "bi_srgb": c.crf_bi_srgb,
            "bi_compat": c.crf_bi_compat}


class IrLabels(LabelStage):
    name, reads, field, cpu_only = "ir_labels", ("cams",), "ir", True
    neutral, report_name = True, "relation_labels"

    def process(self, ctx, in_shard, inputs, out_shard, batch_size=None):
        c = ctx.cfg.ir_labels
        return ir_label_shard(in_shard, inputs[0], out_shard, c.fg_thres, c.bg_thres,
                              ir_crf_settings(ctx.cfg) if ctx.crf else None)

    def describe(self, cfg, size):
        return (f"CAM thresholds {cfg.ir_labels.fg_thres}/{cfg.ir_labels.bg_thres} + dense CRF "
                f"on labels ({cfg.ir_labels.crf_iters} it.) at {size[1]}x{size[0]}")

    def cost_note(self, ctx):
        return ("dense CRF" if ctx.cfg.ir_labels.crf and ctx.crf
                else "no CRF (pydensecrf not installed)")


STAGE = IrLabels()
