"""What the label stages share: the :class:`LabelStage` a stage module provides, the context its
worker gives it (:class:`ShardContext`), and reading and writing one shard.

A stage's shard function reads one dataset shard (and the outputs earlier stages wrote for it),
calls the pure algorithm functions, and writes one output shard holding the same keys plus its new
field, atomically. The serial pipeline and the Ray actors call exactly these. A sample that cannot
be decoded is recorded with its key and reason in the returned summary; the rest of the shard is
processed.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ...config import Config
from ...core.crf import crf_refine
from ...data.shards import SampleError, decode_sample, iter_joined, write_shard


def crf_settings(cfg: Config, enabled: bool, section: str = "aff_labels") -> dict | None:
    """The dense CRF's settings on score maps (``aff_labels.crf_*``, shared by AffinityNet's
    stages and predict; IRN's walk has its own, ``irn_walk.crf_*``), or None when that stage does
    not use it."""
    a = getattr(cfg, section)
    if not enabled:
        return None
    return {"iters": a.crf_iters, "gauss_sxy": a.crf_gauss_sxy, "gauss_compat": a.crf_gauss_compat,
            "bi_sxy": a.crf_bi_sxy, "bi_srgb": a.crf_bi_srgb, "bi_compat": a.crf_bi_compat}


def crf_scores(image, crf: dict, scores):
    return crf_refine(image, scores, **crf)


@dataclass
class ShardContext:
    """What a stage's worker holds while it turns shards into shards: the config, the dataset's
    class count, the device and the model the stage loads (if any), the autocast dtype of its
    forward (None: float32), and whether the CRF settings apply (``bench cost`` without
    pydensecrf turns them off)."""
    cfg: Config
    num_classes: int
    device: torch.device | str = "cpu"
    model: nn.Module | None = None
    dtype: torch.dtype | None = None
    crf: bool = True


class LabelStage:
    """A label stage's behaviour. ``reads``: the earlier label stages whose output shard of the
    same input it joins; ``field``: the field it writes (``<field>.png`` or ``.npy``);
    ``export_array``: ``psa-dist export`` writes it as ``.npy`` maps (else label PNGs),
    ``export_needs_image``: the image is decoded to export it;
    ``cpu_only``: it runs on CPUs whatever the cluster has (``bench cost``); ``neutral``: its labels
    leave pixels neutral (255), scored with their coverage; ``report_name``: its figure's key in
    ``report.json``."""
    name: str
    reads: tuple = ()
    field: str
    export_array = False
    export_needs_image = True
    cpu_only = False
    neutral = False
    report_name = ""

    def choose_precision(self, ctx: ShardContext):
        """The precision of its model's forward on this worker (a ``util.precision.Precision``),
        or None: it runs in float32."""
        return None

    def process(self, ctx: ShardContext, in_shard, inputs: list, out_shard,
                batch_size: int | None = None) -> dict:
        """Turn ``in_shard`` (with ``inputs``: the output shards of ``reads`` for it) into
        ``out_shard``; ``batch_size``: the config's unless given. Returns the shard's summary."""
        raise NotImplementedError

    def exported(self, value: np.ndarray, image_hw: tuple, cfg: Config) -> np.ndarray:
        """Its field as ``psa-dist export`` writes it (a label map at image resolution, or the
        array itself)."""
        return value

    def config_batch(self, cfg: Config) -> int:
        return 1

    def describe(self, cfg: Config, size: tuple) -> str:
        """What ``bench cost`` times of it, in words."""
        raise NotImplementedError

    def cost_note(self, ctx: ShardContext) -> str:
        return ""


def summary(shard, out, t0, n, failed, io: dict) -> dict:
    """A shard's result; ``io``: seconds the worker sat waiting for decoded input
    (``read_wait_seconds``: the read-ahead thread fell behind) and writing its output shard."""
    return {"shard": str(shard), "out": str(out), "samples": n, "failed": failed,
            "seconds": round(time.monotonic() - t0, 3),
            **{f"{k}_seconds": round(v, 3) for k, v in io.items()}}


def write(out_shard, samples, io: dict) -> None:
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


def decoded(data_url, *label_urls, fields=("image", "cls"), label_fields=(), failed=None,
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


