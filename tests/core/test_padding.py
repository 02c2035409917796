"""Images of different sizes processed together never let padding reach an output: each batched
path against the same images processed one by one.

* CAMs: ``cam_multiscale_batch`` on a batch against each image alone, and the label stage's
  ``cam_shard`` (which batches the images of one size wherever they stand in the shard, so no
  CAM batch is padded) on a shard of mixed sizes against ``cam_multiscale`` image by image.
* The walk: ``random_walk_many`` (grids zero-padded to the batch's largest) against
  ``random_walk`` of each image, ``walk_labels`` of a mixed batch against each image alone, and
  ``rw_shard`` walking the whole shard at once against one image at a time.
* The segmenter: a batch of crops padded by ``Augment`` (image 0, label 255 outside the image) has
  the loss of its real pixels only: ``loss_for`` equals the mean over the real pixels computed
  naively per image, the pad gets no gradient, and the same holds for batches from the real
  training loader on the shards.

The images are VOC-shaped synthetic ones cut to sizes that are not multiples of 8, several of
them repeated back to back so that the CAM stage forms real batches.
"""
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from psa_dist.config import SynthConfig, TrainConfig
from psa_dist.core.cam import cam_multiscale, cam_multiscale_batch, rw_inputs
from psa_dist.core.image import normalize, pad_to_multiple
from psa_dist.core.pseudo_labels import walk_labels
from psa_dist.core.random_walk import random_walk, random_walk_many
from psa_dist.data.shards import (
    decode_sample,
    encode_image,
    encode_json,
    encode_mask,
    iter_joined,
    iter_shard,
    write_shard,
)
from psa_dist.data.synth import render
from psa_dist.data.augment import IGNORE, Augment
from psa_dist.data.train_data import make_train_loader
from psa_dist.nets.backbones import build_backbone
from psa_dist.nets.models import AffinityNet, Classifier, LightSegmenter
from psa_dist.stages import table


def loss_for(model_name, model, x, y):
    """A model's training loss on one batch (the kinds' losses ignore the config for these)."""
    return table.kind(model_name).losses(None, None)(False)(model, x, y)
from psa_dist.stages.label_stages.cams import cam_shard
from psa_dist.stages.label_stages.random_walk import rw_shard

NUM_CLASSES = 5
# (H, W): none a multiple of 8 but one, portrait and landscape, 45x61 three times back to back
# and once more apart
SIZES = [(37, 52), (45, 61), (45, 61), (45, 61), (61, 29), (56, 40), (30, 66), (45, 61)]
SCALES = (1.0, 0.5, 1.5)


@pytest.fixture(scope="module")
def samples():
    """Decoded-sample dicts of VOC-shaped synthetic images cut to SIZES (image, mask, classes)."""
    cfg = SynthConfig(image_size=72, num_classes=NUM_CLASSES, max_objects=4,
                      classes_per_image=(1, 3), object_scale=(0.3, 1.0), body_pattern=0.4)
    out = []
    for i, (h, w) in enumerate(SIZES):
        img, mask, _ = render(cfg, "train", i)
        img, mask = img[:h, :w].copy(), mask[:h, :w].copy()
        mask[h // 2, : w // 3] = IGNORE      # some ignore pixels inside the image too
        present = sorted(set(np.unique(mask).tolist()) - {0, IGNORE}) or [1 + i % NUM_CLASSES]
        out.append({"key": f"img{i:02d}", "image": img, "mask": mask, "cls": present})
    return out


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    cls = Classifier(build_backbone("small"), NUM_CLASSES).eval()
    aff = AffinityNet(build_backbone("small"), dims=(8, 8, 8, 16), stride=8).eval()
    seg = LightSegmenter(build_backbone("small"), NUM_CLASSES + 1).eval()
    return cls, aff, seg


@pytest.fixture(scope="module")
def shard(samples, tmp_path_factory):
    path = tmp_path_factory.mktemp("padding") / "train-000000.tar"
    write_shard(path, [{"__key__": s["key"], "png": encode_image(s["image"], "png"),
                        "cls.json": encode_json(s["cls"]), "mask.png": encode_mask(s["mask"])}
                       for s in samples])
    return path


@pytest.fixture(scope="module")
def cams(models, shard, tmp_path_factory):
    """The label stage's CAM shard of ``shard``, batches of up to 4 images of one size."""
    path = tmp_path_factory.mktemp("cams") / "train-000000.tar"
    summary = cam_shard(models[0], shard, path, NUM_CLASSES, SCALES, True, batch_size=4)
    return path, summary


def _hot(ids) -> torch.Tensor:
    hot = torch.zeros(NUM_CLASSES)
    hot[torch.tensor(ids) - 1] = 1
    return hot


def test_cam_batch_equals_each_image_alone(samples, models):
    cls, _, _ = models
    same = [s for s in samples if s["image"].shape[:2] == (45, 61)]
    x = normalize(torch.from_numpy(np.stack([s["image"] for s in same])))
    hot = torch.stack([_hot(s["cls"]) for s in same])
    batch = cam_multiscale_batch(cls, x, hot, SCALES, True)
    for i, s in enumerate(same):
        alone = cam_multiscale(cls, x[i], s["cls"], SCALES, True)
        torch.testing.assert_close(batch[i], alone, rtol=1e-5, atol=1e-6)
        absent = [c for c in range(NUM_CLASSES) if c + 1 not in s["cls"]]
        assert torch.all(batch[i][absent] == 0)
        peak = batch[i][[c - 1 for c in s["cls"]]].amax(dim=(-2, -1))
        assert torch.all(peak <= 1)     # max / (max + 1e-5), or 0 where the ReLU map is all 0


def test_cam_shard_of_mixed_sizes_equals_one_by_one(samples, models, cams):
    cls, _, _ = models
    path, summary = cams
    assert summary["samples"] == len(samples) and summary["failed"] == []
    # images of one size are batched together wherever they stand in the shard: 45x61 four
    # times (one of them apart from the others) in one batch, each other size alone
    assert summary["batches"] == len(set(SIZES))
    got = [decode_sample(r, ["cls", "cam"]) for r in iter_shard(path)]
    assert [g["key"] for g in got] == [s["key"] for s in samples]
    for g, s in zip(got, samples):
        x = normalize(torch.from_numpy(s["image"])[None])[0]
        alone = cam_multiscale(cls, x, s["cls"], SCALES, True)[[c - 1 for c in s["cls"]]]
        assert g["cam"].shape == (len(s["cls"]),) + s["image"].shape[:2]
        np.testing.assert_allclose(g["cam"].astype(np.float32), alone.numpy(), atol=1e-3)


def _features(aff, samples):
    with torch.inference_mode():
        return [aff(pad_to_multiple(normalize(torch.from_numpy(s["image"])[None]), 8))[0]
                for s in samples]


def _random_cams(samples, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand((len(s["cls"]),) + s["image"].shape[:2], generator=g) for s in samples]


@pytest.mark.parametrize("tol", [0.0, 1e-5])
def test_random_walk_many_equals_each_grid_alone(samples, models, tol):
    _, aff, _ = models
    feats = _features(aff, samples)
    grids = {tuple(f.shape[-2:]) for f in feats}
    assert len(grids) >= 4                  # really different grids in one padded batch
    maps = [F.avg_pool2d(F.pad(rw_inputs(c), (0, (-c.shape[-1]) % 8, 0, (-c.shape[-2]) % 8))[None],
                         8)[0] for c in _random_cams(samples)]
    many = random_walk_many(maps, feats, beta=8.0, t=64, radius=5, tol=tol)
    for m, f, got in zip(maps, feats, many):
        alone = random_walk(m[None], f[None], beta=8.0, t=64, radius=5, tol=tol)[0]
        assert got.shape == m.shape
        torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-6 * float(m.abs().max()))


def test_walk_labels_of_a_mixed_batch_equal_each_image_alone(samples, models):
    _, aff, _ = models
    feats, cams = _features(aff, samples), _random_cams(samples, seed=1)
    ids = [s["cls"] for s in samples]
    # ``refine`` sees each image's walked maps (normalised) before the argmax: keep them, unchanged
    seen: dict = {"batch": [], "alone": []}

    def keep(into):
        return lambda maps: seen[into].append(maps.clone()) or maps

    batch = walk_labels(feats, cams, ids, beta=8.0, t=32, radius=5, bg_alpha=4.0, tol=1e-5,
                        refine=[keep("batch")] * len(samples))
    for f, c, i, s, lab in zip(feats, cams, ids, samples, batch):
        alone = walk_labels([f], [c], [i], beta=8.0, t=32, radius=5, bg_alpha=4.0, tol=1e-5,
                            refine=[keep("alone")])[0]
        assert lab.shape == s["image"].shape[:2]
        assert torch.equal(lab, alone)
        assert set(lab.unique().tolist()) <= {0, *i}
    for a, b, s in zip(seen["batch"], seen["alone"], samples):
        assert a.shape == (len(s["cls"]) + 1,) + s["image"].shape[:2]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_rw_shard_walking_the_shard_at_once_equals_one_image_at_a_time(samples, models, shard,
                                                                       cams, tmp_path):
    _, aff, _ = models
    outs = {}
    for b in (len(samples), 1):
        outs[b] = tmp_path / f"rw{b}.tar"
        rw_shard(aff, shard, cams[0], outs[b], t=32, bg_alpha=4.0, batch_size=b, tol=1e-5)
    together = {r["__key__"]: r["pseudo.png"] for r in iter_shard(outs[len(samples)])}
    alone = {r["__key__"]: r["pseudo.png"] for r in iter_shard(outs[1])}
    assert together == alone and list(together) == [s["key"] for s in samples]
    for raw, _ in iter_joined(outs[1]):
        s = next(x for x in samples if x["key"] == raw["__key__"])
        assert decode_sample(raw, ["pseudo"])["pseudo"].shape == s["image"].shape[:2]


def _naive_seg_loss(logits_per_image, labels_per_image) -> float:
    """Cross-entropy summed over every labelled pixel of every image, one pixel at a time in
    float64, divided by the number of those pixels (the pooled mean over the batch's real pixels)."""
    total, count = 0.0, 0
    for logits, labels in zip(logits_per_image, labels_per_image):
        z = logits.double().numpy()
        y = labels.numpy()
        for r in range(y.shape[0]):
            for c in range(y.shape[1]):
                if y[r, c] == IGNORE:
                    continue
                col = z[:, r, c]
                top = col.max()
                total += top + np.log(np.exp(col - top).sum()) - col[y[r, c]]
                count += 1
    return total / count


def _expected_crop(aug: Augment, image, mask, seed: int):
    """Where the image lands in its crop, redone from the augmentation's own draws: (real, label)
    for the crop, ``real`` True on the image's pixels, ``label`` the mask there and 255 around."""
    h, w = mask.shape
    d = aug.draw(h, w, random.Random(seed))
    assert d["size"] == (h, w)              # no resize: the crop holds the mask's own pixels
    ch, cw = max(aug.crop, h), max(aug.crop, w)
    real = np.zeros((ch, cw), bool)
    label = np.full((ch, cw), IGNORE, np.int64)
    m = mask[:, ::-1] if d["flip"] else mask
    real[d["oy"]:d["oy"] + h, d["ox"]:d["ox"] + w] = True
    label[d["oy"]:d["oy"] + h, d["ox"]:d["ox"] + w] = m
    crop = (slice(d["cy"], d["cy"] + aug.crop), slice(d["cx"], d["cx"] + aug.crop))
    return torch.from_numpy(real[crop].copy()), torch.from_numpy(label[crop].copy())


def test_seg_loss_of_padded_crops_counts_only_the_real_pixels(samples, models):
    _, _, seg = models
    aug = Augment(72, resize_long=None, jitter=(0.3, 0.3, 0.3, 0.1))   # every image is padded
    xs, ys, reals = [], [], []
    for i, s in enumerate(samples):
        x, y = aug(s["image"], s["mask"], random.Random(i))
        real, label = _expected_crop(aug, s["image"], s["mask"], i)
        assert torch.equal(y, label)                    # 255 exactly outside the image
        assert torch.all(x[:, ~real] == 0) and not torch.all(x[:, real] == 0, dim=0).any()
        xs.append(x)
        ys.append(y)
        reals.append(real)
    x, y = torch.stack(xs), torch.stack(ys)
    with torch.no_grad():
        loss = loss_for("seg", seg, x, y)
        alone = [seg(xi[None])[0] for xi in xs]        # each crop through the network alone
    assert float(loss) == pytest.approx(_naive_seg_loss(alone, ys), rel=1e-5)
    # the pad's logits get no gradient: whatever the network says there cannot move the loss
    logits = seg(x).detach().requires_grad_()
    loss_for("seg", nn.Identity(), logits, y).backward()
    pad = ~torch.stack(reals)
    assert torch.all(logits.grad.permute(1, 0, 2, 3)[:, pad] == 0)
    assert torch.all(logits.grad.abs().sum(1)[y != IGNORE] > 0)


def test_seg_batches_from_the_loader_pad_with_ignore_only(samples, models, shard, tmp_path):
    # The real loader on the shard, with the masks as labels (seg_full): crops with resizing, so
    # where the image lies is not known here; the pad is wherever the normalised image is exactly
    # 0 in all channels (a real pixel never is: 0.485 * 255 is not an integer).
    _, _, seg = models
    tcfg = TrainConfig(crop_size=64, resize_long=(40, 72), batch_size=4, num_workers=0)
    loader = make_train_loader(table.kind("seg_full").target, [shard], None, NUM_CLASSES, tcfg, [len(samples)])
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == 2
    for x, y in batches:
        pad = (x == 0).all(dim=1)
        assert pad.any() and torch.all(y[pad] == IGNORE)
        with torch.no_grad():
            loss = loss_for("seg_full", seg, x, y)
            alone = [seg(xi[None])[0] for xi in x]
        assert float(loss) == pytest.approx(_naive_seg_loss(alone, list(y)), rel=1e-5)
