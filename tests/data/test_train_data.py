"""The training loader yields each image with its own target, and every epoch reads every sample
once, at any shape of ranks x loader workers (issue 29): shards are split by sample when there are
more (rank, worker) slots than shards, and the shuffle buffer holds only one slot's share."""
import numpy as np
import pytest
import torch

from psa_dist.config import SynthConfig, TrainConfig
from psa_dist.core.image import MEAN, STD, normalize
from psa_dist.data.shards import decode_sample, iter_split, split_shards
from psa_dist.data.synth import write_synth
from psa_dist.data.augment import Augment
from psa_dist.data.train_data import make_train_loader
from psa_dist.stages import table


def test_loader_pairs_images_with_their_labels(tmp_path):
    write_synth(SynthConfig(image_size=32, num_train=24, num_val=2), tmp_path, shard_size=5,
                workers=1, progress=False)
    truth = {}
    for raw in iter_split(tmp_path, "train"):
        s = decode_sample(raw, ["image", "cls", "mask"])
        truth[s["key"]] = s
    tcfg = TrainConfig(batch_size=4, crop_size=32, resize_long=[], color_jitter=[0, 0, 0, 0],
                       num_workers=0)
    for kind in ("cls", "seg_full"):
        loader = make_train_loader(table.kind(kind).target, split_shards(tmp_path, "train"), None, 6, tcfg, [5] * 4 + [4])
        assert len(loader) == 6
        seen = []
        batches = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            batches += list(loader)
        assert len(batches) == 12
        for x, y in batches:
            for xi, yi in zip(x, y):
                match = None
                for key, s in truth.items():
                    ref = normalize(torch.from_numpy(s["image"].copy())[None])[0]
                    for flipped in (False, True):
                        r = ref.flip(-1) if flipped else ref
                        if torch.allclose(xi, r, atol=1e-5):
                            match = (key, flipped)
                assert match is not None
                key, flipped = match
                seen.append(key)
                s = truth[key]
                if kind == "cls":
                    want = torch.zeros(6)
                    want[torch.tensor(s["cls"]) - 1] = 1
                    assert torch.equal(yi, want)
                else:
                    m = torch.from_numpy(s["mask"].astype(np.int64))
                    assert torch.equal(yi, m.flip(-1) if flipped else m)
        counts = {k: seen.count(k) for k in truth}
        # 24 samples, 6 batches of 4 an epoch: each epoch is a permutation of the set
        assert len(seen) == 48 and set(counts.values()) == {2}, counts
        assert set(seen[:24]) == set(truth) and seen[:24] != seen[24:]


def test_augment_keeps_image_and_label_aligned():
    rng = np.random.default_rng(0)
    # 10-pixel blocks: smooth enough that bilinear resizing keeps each block's colour
    blocks = rng.integers(0, 255, (5, 7, 3), dtype=np.uint8)
    img = np.repeat(np.repeat(blocks, 10, 0), 10, 1)
    lab = (img[..., 0] > 127).astype(np.uint8)
    aug = Augment(crop=48, resize_long=(60, 90), jitter=None)
    for _ in range(10):
        x, y = aug(img, lab)
        assert x.shape == (3, 48, 48) and y.shape == (48, 48)
        valid = y != 255
        # channel 0 after normalisation is monotone in the red value: label must agree with it
        red = x[0] * 0.229 + 0.485
        agree = ((red > 0.5) == (y == 1))[valid].float().mean()
        assert agree > 0.9
        assert torch.all(x[:, ~valid] == 0)


def test_seg_loader_leaves_out_the_background_of_labels_missing_a_class(tmp_path):
    """train_seg.missing_class_frac: the pseudo label of an image that lost one of its image-level
    classes keeps its class pixels and has its background ignored (255); the others are untouched."""
    from psa_dist.data.shards import encode_mask, write_shard
    data = tmp_path / "data"
    write_synth(SynthConfig(image_size=32, num_train=12, num_val=2, min_objects=2, max_objects=2,
                            num_classes=6), data, shard_size=6, workers=1, progress=False)
    truth, labels, per_shard = {}, tmp_path / "rw", {}
    labels.mkdir()
    for raw in iter_split(data, "train"):
        s = decode_sample(raw, ["image", "cls", "mask"])
        pseudo = s["mask"].copy()
        lost = len(s["cls"]) > 1 and int(s["key"][-1]) % 2 == 0
        if lost:
            pseudo[pseudo == s["cls"][0]] = 0              # the walk lost this class's object
        truth[s["key"]] = (s, pseudo, lost)
        per_shard.setdefault(raw["__url__"], []).append(
            {"__key__": s["key"], "pseudo.png": encode_mask(pseudo)})
    for shard in split_shards(data, "train"):
        write_shard(labels / shard.name, per_shard[str(shard)])
    assert any(v[2] for v in truth.values()) and not all(v[2] for v in truth.values())
    tcfg = TrainConfig(batch_size=4, crop_size=32, resize_long=[], color_jitter=[0, 0, 0, 0],
                       num_workers=0, missing_class_frac=0.01)
    shards = split_shards(data, "train")
    loader = make_train_loader(table.kind("seg").target, shards, [labels / s.name for s in shards], 6, tcfg, [6, 6])
    checked = set()
    for x, y in loader:
        for xi, yi in zip(x, y):
            for key, (s, pseudo, lost) in truth.items():
                ref = normalize(torch.from_numpy(s["image"].copy())[None])[0]
                for flipped in (False, True):
                    if torch.allclose(xi, ref.flip(-1) if flipped else ref, atol=1e-5):
                        want = torch.from_numpy(pseudo.astype(np.int64))
                        if lost:
                            want = torch.where(want == 0, torch.full_like(want, 255), want)
                        assert torch.equal(yi, want.flip(-1) if flipped else want), key
                        checked.add(lost)
    assert checked == {True, False}


# ----------------------------------------------------------------------------- coverage at scale
def _indexed_shards(root, counts, labels_root=None, drop=()):
    """Shards of tiny one-colour images whose colour encodes the sample's index (so a batch says
    which samples it holds, flipped or not); with ``labels_root``, label shards (``pseudo.png``,
    every pixel the index's class, 1 + index % 5) without the keys ``drop``."""
    from psa_dist.data.shards import encode_image, encode_json, encode_mask, write_shard
    paths, label_paths, i = [], [], 0
    for n, count in enumerate(counts):
        samples, labels = [], []
        for _ in range(count):
            img = np.zeros((4, 4, 3), np.uint8)
            img[..., 0], img[..., 1], img[..., 2] = i % 256, i // 256, 7
            samples.append({"__key__": f"s{i:06d}", "png": encode_image(img, "png"),
                            "cls.json": encode_json([1 + i % 5])})
            if i not in drop:
                labels.append({"__key__": f"s{i:06d}",
                               "pseudo.png": encode_mask(np.full((4, 4), 1 + i % 5, np.uint8))})
            i += 1
        paths.append(root / f"train-{n:06d}.tar")
        write_shard(paths[-1], samples)
        if labels_root is not None:
            label_paths.append(labels_root / paths[-1].name)
            write_shard(label_paths[-1], labels)
    return paths, label_paths


def _index_of(x):
    """The sample index an image of :func:`_indexed_shards` encodes."""
    rgb = [round(float(x[c, 0, 0] * STD[c] + MEAN[c]) * 255) for c in range(3)]
    assert rgb[2] == 7, rgb
    return rgb[0] + 256 * rgb[1]


def _epoch(loader, epoch, workers):
    """Every (rank's) logical worker's batches of one epoch, as lists of sample indices."""
    loader.set_epoch(epoch)
    return [[[_index_of(x) for x in xs] for xs, _ in loader.stream.worker_batches(w, workers)]
            for w in range(workers)]


TINY = dict(crop_size=4, resize_long=[], color_jitter=[0, 0, 0, 0])


@pytest.mark.parametrize("world,workers,shards,per_shard", [
    (1, 1, 166, 6), (2, 1, 166, 6), (4, 3, 166, 6), (16, 2, 166, 6), (64, 6, 166, 6),
    (64, 6, 48, 20),        # 384 slots on 48 shards
    (8, 4, 1, 300),         # a single shard
])
def test_every_sample_once_per_epoch_at_any_shape(tmp_path, world, workers, shards, per_shard):
    """The issue's shapes (16 x 2 read 21% of the samples before) up to 64 ranks x 6 workers on
    COCO's 166 shards: in one epoch no sample is read twice, every rank trains the same number
    of batches, and what is not trained is only each rank's last, short batch (fewer than
    batch_size + 1 samples a rank; a different few each epoch)."""
    paths, _ = _indexed_shards(tmp_path, [per_shard] * shards)
    total, batch = shards * per_shard, 2
    tcfg = TrainConfig(batch_size=batch, num_workers=workers, **TINY)
    steps = total // (batch * world)
    left_out = []
    for epoch in range(2):
        seen = []
        for rank in range(world):
            loader = make_train_loader(table.kind("cls").target, paths, None, 6, tcfg, [per_shard] * shards,
                                       rank=rank, world_size=world, seed=1)
            assert len(loader) == steps
            per_worker = _epoch(loader, epoch, workers)
            assert sum(len(b) for b in per_worker) == steps        # every rank: the same steps
            mine = [i for b in per_worker for xs in b for i in xs]
            assert len(mine) == steps * batch
            # this rank's share, the pieces of every worker, holds what it trained and at most
            # one batch more
            share = [i for w in range(workers) for g, a, b in loader.stream.share(w, workers)
                     for i in range(g * per_shard + a, g * per_shard + (per_shard if b is None
                                                                         else b))]
            assert set(mine) <= set(share) and len(share) - len(mine) <= batch
            seen += mine
        assert len(seen) == len(set(seen)) == world * steps * batch      # nothing read twice
        left_out.append(set(range(total)) - set(seen))
        assert len(left_out[-1]) == total - world * steps * batch < world * (batch + 1)
    assert left_out[0] != left_out[1] or not left_out[0]


@pytest.mark.parametrize("world,workers", [(3, 2), (64, 6)])
def test_epoch_shares_are_disjoint_and_cover_the_set(world, workers):
    """The plan itself (no reading): at any shape, the pieces of all (rank, worker) slots tile
    every shard exactly once, and the ranks' shares differ by at most one sample."""
    from psa_dist.data.train_data import epoch_shares
    counts = [500] * 165 + [283]          # COCO's 82,783 train images in shards of 500
    order = list(range(len(counts)))
    np.random.default_rng(0).shuffle(order)
    shares = epoch_shares(counts, order, world, [2] * workers)
    cover = [np.zeros(c, np.int32) for c in counts]
    sizes = []
    for row in shares:
        n = 0
        for pieces in row:
            for g, a, b in pieces:
                cover[g][a:b] += 1
                n += (counts[g] if b is None else b) - a
        sizes.append(n)
    assert all((c == 1).all() for c in cover)
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == sum(counts)


def test_label_shards_stay_in_lockstep_when_shards_are_split(tmp_path):
    """Pseudo-label shards joined with their dataset shards, split by sample between 4 ranks x 2
    workers (8 slots on 2 shards): every image comes with its own label, a key missing from the
    label shard (a sample the stage failed on) is passed over, and the rest come once."""
    labels = tmp_path / "labels"
    labels.mkdir()
    paths, label_paths = _indexed_shards(tmp_path, [20, 20], labels, drop={3, 25})
    tcfg = TrainConfig(batch_size=2, num_workers=2, **TINY)
    seen = []
    for rank in range(4):
        loader = make_train_loader(table.kind("seg").target, paths, label_paths, 6, tcfg, [20, 20], rank=rank,
                                   world_size=4, seed=0)
        loader.set_epoch(0)
        for w in range(2):
            for xs, ys in loader.stream.worker_batches(w, 2):
                for x, y in zip(xs, ys):
                    i = _index_of(x)
                    assert torch.all(y == 1 + i % 5), i
                    seen.append(i)
    assert 3 not in seen and 25 not in seen
    # 38 labelled samples; 4 ranks x 5 steps x 2 = 40 batches' places: the two slots that lost a
    # sample read their share again for it, the only repeats
    assert len(seen) == 40 and len(set(seen)) == 38


def test_a_split_shard_resumes_mid_epoch_exactly(tmp_path):
    """One shard, 3 ranks x 2 real loader worker processes: a rank resumed after 2 steps yields
    exactly the rest of its epoch, and the ranks read disjoint samples."""
    paths, _ = _indexed_shards(tmp_path, [60])
    tcfg = TrainConfig(batch_size=4, num_workers=2, **TINY)
    ranks = []
    for rank in range(3):
        loader = make_train_loader(table.kind("cls").target, paths, None, 6, tcfg, [60], rank=rank, world_size=3)
        loader.set_epoch(1)
        full = [[_index_of(x) for x in xs] for xs, _ in loader]
        loader.set_epoch(1, skip=2)
        assert [[_index_of(x) for x in xs] for xs, _ in loader] == full[2:]
        ranks.append({i for b in full for i in b})
    assert len(ranks[0] | ranks[1] | ranks[2]) == 60


def test_held_out_set_is_read_once_over_many_ranks(tmp_path):
    """A stopping rule's held-out shard at 64 ranks: each held-out sample on exactly one rank,
    once, in batches whose last one is short (before: every rank read a batch of the shard's
    first samples, a handful of distinct images in all)."""
    paths, _ = _indexed_shards(tmp_path, [150])
    tcfg = TrainConfig(batch_size=4, num_workers=0, **TINY)
    seen = []
    for rank in range(64):
        loader = make_train_loader(table.kind("cls").target, paths, None, 6, tcfg, [150], rank=rank, world_size=64,
                                   finite=True)
        loader.set_epoch(0)
        batches = [[_index_of(x) for x in xs] for xs, _ in loader]
        assert all(0 < len(b) <= 4 for b in batches)
        seen += [i for b in batches for i in b]
    assert sorted(seen) == list(range(150))
