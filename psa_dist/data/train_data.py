"""Training data: WebDataset shards (optionally joined with a stage's label shards) as batches.

A training set is a list of shard *groups*: the dataset shard and, for AffinityNet and the segmenter,
the label shard a stage wrote for it (same keys, same order), with its sample count. Each epoch the
groups are shuffled the same way on every rank and their samples cut into one disjoint share per
(rank, loader worker), splitting shards by sample where ranks x workers outnumber them
(:func:`epoch_shares`): an epoch trains on every sample once, at any job shape. A share is read as
raw samples, shuffled in a buffer, decoded, augmented as the paper does (random resize of the long
side, flip, colour jitter, crop) and batched.

Every rank runs exactly ``steps`` batches an epoch (a share that runs short is read again), so DDP
never waits on a rank that ran out. And an epoch's batches are a pure function of (seed, epoch,
rank, worker): shuffles and augmentations draw from generators seeded by those, never from global
state. A run resumed from a checkpoint taken after step k of an epoch skips the first k batches
without decoding them and then sees exactly what an uninterrupted run sees (see
``engine/trainer.py``).
"""
from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import webdataset as wds

from ..core.cam import distrust_background
from .augment import IGNORE, Augment
from .shards import SampleError, decode_sample, iter_joined


@dataclass(frozen=True)
class Target:
    """What a trainer learns from (each model kind has one, ``stages/kinds/``): the fields decoded
    from the dataset shard (``fields``) and from the label stage's shard joined to it by key
    (``joined``), and what becomes the target: the image's classes as a multi-hot vector
    (``label`` None) or the label map ``label``, on the image's cell grid of the loader's
    ``label_stride`` (``on_cells``), its background distrusted where a class is missing
    (``distrust_background``: ``missing_class_frac``, the segmenter on pseudo labels)."""
    name: str                       # the model's name, in errors
    fields: tuple = ("image", "cls")
    joined: tuple = ()
    label: str | None = None
    on_cells: bool = False
    distrust_background: bool = False


class ToTraining:
    """Decoded sample -> (image tensor, target) as ``target`` says."""

    def __init__(self, target: Target, num_classes: int, augment: Augment,
                 missing_class_frac: float | None = None):
        self.target, self.num_classes, self.augment = target, num_classes, augment
        self.missing_class_frac = missing_class_frac if target.distrust_background else None

    def __call__(self, s: dict, rng: random.Random | None = None):
        field = self.target.label
        if field is None:
            x, _ = self.augment(s["image"], None, rng)
            y = torch.zeros(self.num_classes)
            y[torch.tensor(s["cls"], dtype=torch.long) - 1] = 1.0
            return x, y
        if field not in s:
            raise SampleError(f"sample {s['key']!r} has no {field!r} field for "
                              f"{self.target.name} training")
        label = s[field]
        if self.missing_class_frac is not None:
            label = distrust_background(torch.from_numpy(label.astype(np.int64)), s["cls"],
                                        self.missing_class_frac, IGNORE).numpy()
        try:
            return self.augment(s["image"], label, rng)
        except ValueError as e:     # e.g. affinity labels of another stride: name the sample
            raise SampleError(f"sample {s['key']!r}: {field}: {e}") from None



def _groups(urls: Sequence, label_urls: Sequence | None, counts: Sequence[int]) -> list[dict]:
    if label_urls is not None and len(label_urls) != len(urls):
        raise ValueError(f"{len(urls)} dataset shards but {len(label_urls)} label shards")
    if len(counts) != len(urls):
        raise ValueError(f"{len(urls)} dataset shards but {len(counts)} sample counts")
    return [{"url": str(u), "labels": str(label_urls[i]) if label_urls else None,
             "count": int(counts[i])} for i, u in enumerate(urls)]


def epoch_shares(counts: Sequence[int], order: Sequence[int], world: int,
                 weights: Sequence[int]) -> list[list[list[tuple]]]:
    """Who reads what in one epoch: ``shares[rank][worker]`` is a list of ``(shard index, start,
    stop)`` pieces (``stop`` None: to the shard's end), disjoint, whose union is every sample.

    The shards, in ``order`` (the epoch's shuffle), are laid end to end as one sequence of
    ``sum(counts)`` samples; rank r takes the r-th of ``world`` contiguous, equal parts (sizes
    differ by at most 1), and cuts it between its loader workers in proportion to ``weights``
    (the batches each worker makes). A shard is split by sample wherever a cut falls inside it, so
    any number of ranks x workers, more than there are shards included, reads disjoint shares: no
    share is read twice and none is left out (issue 29: with whole shards per slot, the tail of
    every shard was never trained on when slots outnumbered shards)."""
    starts, pos = [], 0
    for g in order:
        starts.append(pos)
        pos += counts[g]
    total, whole = pos, sum(weights)

    def pieces(lo: int, hi: int) -> list[tuple]:
        out = []
        for k in range(max(0, bisect.bisect_right(starts, lo) - 1), len(order)):
            g, start = order[k], starts[k]
            if start >= hi:
                break
            end = start + counts[g]
            a, b = max(lo, start), min(hi, end)
            if a < b:
                out.append((g, a - start, None if b == end else b - start))
        return out

    shares = []
    for r in range(world):
        lo, hi = total * r // world, total * (r + 1) // world
        row, cum = [], 0
        for w in weights:
            a = lo + (hi - lo) * cum // max(whole, 1)
            cum += w
            row.append(pieces(a, lo + (hi - lo) * cum // max(whole, 1)))
        shares.append(row)
    return shares


class ShardStream(torch.utils.data.IterableDataset):
    """The batches of one epoch for one rank and loader worker.

    Each epoch the shard groups are shuffled by (seed, epoch), identically on every rank, and
    :func:`epoch_shares` gives every (rank, worker) its own disjoint share of the samples, shards
    split by sample where there are more ranks x workers than shards. A worker reads its pieces in
    order (the samples before a piece's start are read but not decoded: a tar is read from its
    start), through a shuffle buffer that holds only its own share, so an epoch repeats no sample
    and its union over ranks and workers is the whole training set. Every rank makes ``steps``
    batches; the samples its share holds beyond ``steps x batch_size`` (fewer than a batch plus
    one) are those the buffer would have yielded last, a different few each epoch. A share runs
    short only when samples are missing (undecodable, or not in a label shard: a stage that failed
    on them) or when a rank's share is smaller than its batches (``stages/job_shape.py`` warns): the worker
    then reads its share again, reshuffled.

    Worker w makes global batches w, w + workers, ... of the epoch, the order in which the
    DataLoader interleaves them; the first ``skip`` of the epoch are read but not decoded.
    ``finite``: the held-out set of a stopping rule: every worker yields its share once, in batches
    of up to ``batch_size`` (the last one short), whatever ``steps`` says.
    """

    def __init__(self, groups: list[dict], to_training: ToTraining, batch_size: int,
                 steps: int, rank: int, world: int, seed: int, shuffle_buffer: int,
                 finite: bool = False):
        self.groups, self.target, self.to_training = groups, to_training.target, to_training
        self.batch_size, self.steps, self.rank, self.world = batch_size, steps, rank, world
        self.seed, self.shuffle_buffer, self.finite = seed, shuffle_buffer, finite
        self.epoch, self.skip = 0, 0

    def batches_of(self, workers: int) -> list[range]:
        """The global batch indices each of ``workers`` loader workers makes this epoch."""
        return [range(w, self.steps, workers) for w in range(workers)]

    def share(self, worker: int, workers: int) -> list[tuple]:
        """This rank's worker ``worker``'s pieces of the epoch (:func:`epoch_shares`)."""
        order = list(range(len(self.groups)))
        random.Random(f"{self.seed}/{self.epoch}").shuffle(order)
        weights = [1] * workers if self.finite else [len(b) for b in self.batches_of(workers)]
        counts = [g["count"] for g in self.groups]
        return epoch_shares(counts, order, self.world, weights)[self.rank][worker]

    def _read(self, pieces: list[tuple]):
        for g, start, stop in pieces:
            group = self.groups[g]
            labels = [group["labels"]] if group["labels"] else []
            yield from itertools.islice(iter_joined(group["url"], *labels), start, stop)

    def _raw(self, worker: int, workers: int, rng: random.Random):
        """Raw samples (bytes, joined with their labels) of this worker's share, shuffled in a
        buffer; endless unless ``finite``: a share that runs short is read again, as a pass of its
        own, after the buffer has yielded every sample of the pass before (so no sample repeats
        before every other has come)."""
        mine = self.share(worker, workers)
        shuffle = wds.shuffle(max(1, self.shuffle_buffer // workers),
                              initial=max(1, self.shuffle_buffer // workers), rng=rng)

        def passes():
            yield from shuffle(self._read(mine))
            if self.finite:
                return
            # A worker whose share is empty (fewer samples than ranks x workers) reads the whole
            # set, so that its rank still has batches.
            again = list(mine) or [(g, 0, None) for g in range(len(self.groups))]
            while True:
                rng.shuffle(again)
                n = 0
                for n, sample in enumerate(shuffle(self._read(again)), 1):
                    yield sample
                if n == 0:
                    raise SampleError(f"rank {self.rank}, loader worker {worker}: no sample in "
                                      f"its share {again} of shards "
                                      f"{[self.groups[g]['url'] for g, _, _ in again]}")

        return iter(passes())

    def _decode(self, raw: dict, labs: list[dict]) -> dict:
        s = decode_sample(raw, list(self.target.fields))
        for lab in labs:
            s.update({k: v for k, v in decode_sample(lab, list(self.target.joined)).items()
                      if k != "key"})
        return s

    def _batches(self, raw, tag: str, n: int, count: int | None):
        """``count`` batches (None: until ``raw`` ends, the last one short) from ``raw``; ``n``:
        raw samples taken so far, which seeds each sample's augmentation."""
        made = 0
        while count is None or made < count:
            xs, ys = [], []
            while len(xs) < self.batch_size:
                got = next(raw, None)
                if got is None:
                    break
                sample, labs = got
                n += 1
                try:
                    x, y = self.to_training(self._decode(sample, labs), random.Random(f"{tag}/{n}"))
                except SampleError as e:    # reported and passed over; training goes on
                    print(f"[data] skipping undecodable sample: {e}", flush=True)
                    continue
                xs.append(x)
                ys.append(y)
            if not xs:
                return
            made += 1
            yield torch.stack(xs), torch.stack(ys)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers = info.num_workers if info else 1
        # The DataLoader takes batches from its workers in turn starting with worker 0; after a
        # resume the first batch due is ``skip``, made by logical worker skip % workers, so the
        # DataLoader's worker i plays logical worker (i + skip) % workers.
        yield from self.worker_batches(((info.id if info else 0) + self.skip) % workers, workers)

    def worker_batches(self, worker: int, workers: int):
        """The batches logical loader worker ``worker`` of ``workers`` makes this epoch."""
        tag = f"{self.seed}/{self.epoch}/{self.rank}/{worker}"
        raw = self._raw(worker, workers, random.Random(tag))
        if self.finite:
            yield from self._batches(raw, tag, 0, None)
            return
        mine = self.batches_of(workers)[worker]             # global batch indices made here
        n_skip = sum(1 for j in mine if j < self.skip)
        for _ in range(n_skip * self.batch_size):
            next(raw)
        yield from self._batches(raw, tag, n_skip * self.batch_size, len(mine) - n_skip)


class EpochLoader:
    """Batches of one epoch at a time: ``set_epoch(e, skip)`` then iterate; ``len`` = steps."""

    def __init__(self, stream: ShardStream, num_workers: int, pin_memory: bool = False):
        self.stream, self.num_workers, self.pin_memory = stream, num_workers, pin_memory

    def __len__(self) -> int:
        return self.stream.steps

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.stream.epoch, self.stream.skip = epoch, skip

    def __iter__(self):
        # Fresh workers each epoch: they start from this epoch's state (epoch, skip).
        return iter(wds.WebLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                                  pin_memory=self.pin_memory))


def make_train_loader(target: Target, urls: Sequence, label_urls: Sequence | None, num_classes: int,
                      train_cfg, counts: Sequence[int], rank: int = 0, world_size: int = 1,
                      seed: int = 0, pin_memory: bool = False, label_stride: int = 8,
                      num_samples: int | None = None, finite: bool = False) -> EpochLoader:
    """The loader of one rank over shards ``urls`` holding ``counts`` samples each; every rank
    gets ``num_samples // (batch_size * world_size)`` steps (``num_samples``: the samples of an
    epoch, by default all of them; more reads shares again). ``finite``: every sample once, in
    batches whose last one may be short (a held-out set). ``label_stride``: the cell grid of
    AffinityNet's labels (``model.aff_stride``), for a target ``on_cells``."""
    aug = Augment(train_cfg.crop_size, tuple(train_cfg.resize_long) if train_cfg.resize_long else None,
                  tuple(train_cfg.color_jitter), label_stride=label_stride if target.on_cells else 1)
    groups = _groups(urls, label_urls, counts)
    num_samples = sum(g["count"] for g in groups) if num_samples is None else num_samples
    steps = max(1, num_samples // (train_cfg.batch_size * world_size))
    # The buffer holds only this rank's share (see ShardStream), so it can span all of it; 1000
    # raw samples at most (COCO's: about 160 MB) are held, split between the workers.
    buf = max(1, min(1000, num_samples // world_size))
    to_training = ToTraining(target, num_classes, aug,
                             getattr(train_cfg, "missing_class_frac", None))
    stream = ShardStream(groups, to_training, train_cfg.batch_size, steps, rank, world_size,
                         seed, buf, finite=finite)
    return EpochLoader(stream, train_cfg.num_workers, pin_memory)
