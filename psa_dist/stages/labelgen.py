"""Label generation, one input shard at a time: CAMs, affinity labels, random-walk pseudo labels.

Each ``*_shard`` function reads one dataset shard (and the outputs earlier stages wrote for it),
calls the pure algorithm functions, and writes one output shard holding the same keys plus its new
field, atomically. The serial pipeline and the Ray actors call exactly these. A sample that cannot
be decoded is recorded with its key and reason in the returned summary; the rest of the shard is
processed.
"""
from __future__ import annotations

import functools
import queue
import threading
import time

import numpy as np
import torch

from ..core.affinity import affinity_labels
from ..core.cam import cam_multiscale_batch
from ..core.crf import crf_refine
from ..core.image import normalize, pad_to_multiple
from ..core.pseudo_labels import walk_labels
from ..data.shards import (
    SampleError,
    decode_sample,
    encode_json,
    encode_mask,
    encode_npy,
    iter_joined,
    write_shard,
)
from ..util.precision import autocast


def _summary(shard, out, t0, n, failed, io: dict) -> dict:
    """A shard's result; ``io``: seconds the worker sat waiting for decoded input
    (``read_wait_seconds``: the read-ahead thread fell behind) and writing its output shard."""
    return {"shard": str(shard), "out": str(out), "samples": n, "failed": failed,
            "seconds": round(time.monotonic() - t0, 3),
            **{f"{k}_seconds": round(v, 3) for k, v in io.items()}}


def _write(out_shard, samples, io: dict) -> None:
    t = time.monotonic()
    write_shard(out_shard, samples)
    io["write"] = io.get("write", 0.0) + time.monotonic() - t


def prefetch(iterable, depth: int = 8, io: dict | None = None):
    """Run ``iterable`` in a background thread, ``depth`` items ahead, so that reading and decoding
    (which release the GIL in zlib, libjpeg and libpng) overlap with the model's compute. Time
    spent blocked on the queue is added to ``io["read_wait"]``."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce():
        try:
            for item in iterable:
                q.put(item)
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            q.put(e)

    threading.Thread(target=produce, daemon=True).start()
    io = io if io is not None else {}
    io.setdefault("read_wait", 0.0)
    while True:
        t = time.monotonic()
        item = q.get()
        io["read_wait"] += time.monotonic() - t
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def _decoded(data_url, *label_urls, fields=("image", "cls"), label_fields=(), failed=None,
             io=None):
    """Decoded (data, labels) pairs, read ahead in a thread; decode failures go to ``failed``."""
    return prefetch(_decode_all(data_url, *label_urls, fields=fields, label_fields=label_fields,
                                failed=failed), io=io)


def _decode_all(data_url, *label_urls, fields, label_fields, failed):
    for raw, labs in iter_joined(data_url, *label_urls):
        try:
            s = decode_sample(raw, fields)
            for lab in labs:
                s.update({k: v for k, v in decode_sample(lab, label_fields).items() if k != "key"})
        except SampleError as e:
            failed.append({"key": raw["__key__"], "reason": str(e)})
            continue
        yield s


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

    for s in _decoded(in_shard, failed=failed, io=io):
        order[s["key"]] = len(order)
        group = groups.setdefault(s["image"].shape, [])
        group.append(s)
        if len(group) >= batch_size:
            flush(group)
    for group in groups.values():
        flush(group)
    out.sort(key=lambda r: order[r["__key__"]])      # the input shard's order
    _write(out_shard, out, io)
    return {**_summary(in_shard, out_shard, t0, len(out), failed, io), "batches": batches}


def aff_label_shard(in_shard, cams_shard, out_shard, alpha_lo=4.0, alpha_hi=32.0,
                    crf: dict | None = None, stride: int = 8) -> dict:
    """Confident-region labels (``aff.png``: 0 bg, class id, 255 neutral) from the CAMs, with the
    dense CRF on both score maps when ``crf`` (its settings) is given, on AffinityNet's cell grid
    of ``stride`` (``cell_grid`` of the image): each cell's decision from the scores averaged over
    its pixels, as the authors' trainer takes them (``AvgPool2d(8)`` of the score maps, then the
    argmax), never from one pixel of it."""
    t0, failed, out, io = time.monotonic(), [], [], {}
    for s in _decoded(in_shard, cams_shard, label_fields=("cam",), failed=failed, io=io):
        cams = torch.from_numpy(s["cam"].astype(np.float32))
        refine = None if crf is None else functools.partial(_crf_scores, s["image"], crf)
        lab = affinity_labels(cams, alpha_lo, alpha_hi, refine=refine, class_ids=s["cls"],
                              pool=stride)
        out.append({"__key__": s["key"], "aff.png": encode_mask(lab.numpy().astype(np.uint8))})
    _write(out_shard, out, io)
    return _summary(in_shard, out_shard, t0, len(out), failed, io)


def _crf_scores(image, crf: dict, scores):
    return crf_refine(image, scores, **crf)


@torch.inference_mode()
def walk_images(aff_model, images: list, cams: list, class_ids: list, beta=8.0, t=256, radius=5,
                bg_alpha=16.0, device="cpu", tol: float = 0.0, crf: dict | None = None) -> list:
    """Pseudo labels of several images (uint8 (H, W, 3) arrays with their CAMs): AffinityNet's
    features of each image zero-padded to a multiple of 8, then :func:`walk_labels` of the batch
    (``crf``: the dense CRF's settings, on each image's walked maps)."""
    feats = [aff_model(pad_to_multiple(normalize(torch.from_numpy(im)[None].to(device)), 8))[0]
             for im in images]
    refine = [None if crf is None else functools.partial(_crf_scores, im, crf) for im in images]
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

    for s in _decoded(in_shard, cams_shard, label_fields=("cam",), failed=failed, io=io):
        batch.append(s)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    _write(out_shard, out, io)
    return _summary(in_shard, out_shard, t0, len(out), failed, io)
