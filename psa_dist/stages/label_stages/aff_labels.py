"""``aff_labels``: confident-region affinity labels from the CAMs (``core.affinity.affinity_labels``
at ``alpha_lo``/``alpha_hi``, the dense CRF on both score maps with ``crf``), one ``aff.png`` per
image on AffinityNet's cell grid. CPU work: thresholds and the CRF."""
from __future__ import annotations

import functools
import time

import numpy as np
import torch

from ...core.affinity import affinity_labels, cells_to_pixels
from ...data.shards import encode_mask
from .base import LabelStage, crf_scores, crf_settings, decoded, summary, write


def aff_label_shard(in_shard, cams_shard, out_shard, alpha_lo=4.0, alpha_hi=32.0,
                    crf: dict | None = None, stride: int = 8) -> dict:
    """Confident-region labels (``aff.png``: 0 bg, class id, 255 neutral) from the CAMs, with the
    dense CRF on both score maps when ``crf`` (its settings) is given, on AffinityNet's cell grid
    of ``stride`` (``cell_grid`` of the image): each cell's decision from the scores averaged over
    its pixels, as the authors' trainer takes them (``AvgPool2d(8)`` of the score maps, then the
    argmax), never from one pixel of it."""
    t0, failed, out, io = time.monotonic(), [], [], {}
    for s in decoded(in_shard, cams_shard, label_fields=("cam",), failed=failed, io=io):
        cams = torch.from_numpy(s["cam"].astype(np.float32))
        refine = None if crf is None else functools.partial(crf_scores, s["image"], crf)
        lab = affinity_labels(cams, alpha_lo, alpha_hi, refine=refine, class_ids=s["cls"],
                              pool=stride)
        out.append({"__key__": s["key"], "aff.png": encode_mask(lab.numpy().astype(np.uint8))})
    write(out_shard, out, io)
    return summary(in_shard, out_shard, t0, len(out), failed, io)


class AffLabels(LabelStage):
    name, reads, field, cpu_only = "aff_labels", ("cams",), "aff", True
    neutral, report_name = True, "affinity_labels"

    def process(self, ctx, in_shard, inputs, out_shard, batch_size=None):
        a = ctx.cfg.aff_labels
        return aff_label_shard(in_shard, inputs[0], out_shard, a.alpha_lo, a.alpha_hi,
                               crf_settings(ctx.cfg, a.crf and ctx.crf), ctx.cfg.model.aff_stride)

    def exported(self, value, image_hw, cfg):
        # from AffinityNet's cell grid to the image's pixels
        return cells_to_pixels(torch.from_numpy(value), *image_hw, cfg.model.aff_stride).numpy()

    def describe(self, cfg, size):
        return (f"CAM thresholds + dense CRF ({cfg.aff_labels.crf_iters} it.) at "
                f"{size[1]}x{size[0]}")

    def cost_note(self, ctx):
        return ("dense CRF" if ctx.cfg.aff_labels.crf and ctx.crf
                else "no CRF (pydensecrf not installed)")


STAGE = AffLabels()
