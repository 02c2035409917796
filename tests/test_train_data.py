"""The training loader yields each image with its own target and covers the data evenly.

The stream is endless and shuffled through a buffer that spans epoch boundaries (WebDataset's
model), so an "epoch" is a fixed number of steps, not an exact permutation: over two epochs every
sample but those held in the shuffle buffer is seen, and none much more often than the others."""
import numpy as np
import torch

from psa_dist.config import SynthConfig, TrainConfig
from psa_dist.core.image import normalize
from psa_dist.data.shards import decode_sample, iter_split, split_shards
from psa_dist.data.synth import write_synth
from psa_dist.data.train_data import Augment, make_train_loader


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
        loader = make_train_loader(kind, split_shards(tmp_path, "train"), None, 6, tcfg, 24)
        assert len(loader) == 6
        seen = []
        batches = [b for _ in range(2) for b in loader]   # two epochs
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
        # each epoch restarts the stream at a fresh pass; only the shuffle buffer (6 here) spills
        assert len(seen) == 48 and max(counts.values()) <= 4, counts
        assert sum(c > 0 for c in counts.values()) >= 20, counts


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
    loader = make_train_loader("seg", shards, [labels / s.name for s in shards], 6, tcfg, 12)
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
