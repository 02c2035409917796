"""AffinityNet's training labels and loss held against the authors' pipeline (jiwoon-ahn/psa),
re-written here naively from its description: the label score maps cropped together with the
image into a zero container, flipped, averaged over every 8x8 cell, the argmax of the low- and
high-alpha maps, confident foreground / confident background / neutral, and cells with no score
neutral; and the loss's pair window, which starts pairs only away from the crop's border."""
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from psa_dist.core.affinity import affinity_labels, affinity_loss, background_score, cells_to_pixels
from psa_dist.data.shards import (
    decode_sample,
    encode_image,
    encode_json,
    encode_npy,
    iter_joined,
    write_shard,
)
from psa_dist.data.augment import Augment
from psa_dist.data.train_data import ToTraining
from psa_dist.stages.label_stages.aff_labels import aff_label_shard
from psa_dist.stages import table


def smooth_cams(g, k, h, w):
    """Smooth random CAMs in [0, 1]: low-resolution noise upsampled, as CAMs look."""
    low = torch.rand(k, max(2, h // 24), max(2, w // 24), generator=g)
    cams = F.interpolate(low[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return (cams - cams.amin()) / (cams.amax() - cams.amin())


def authors_cell_labels(cams, alpha_lo, alpha_hi, d, crop, stride=8):
    """The authors' labels of one training crop, naively (numpy, loops over cells), given the
    crop's geometry ``d`` (from Augment.draw): score maps [bg, classes] for both alphas, the
    image placed at (oy, ox) of a zero canvas, the crop at (cy, cx), the flip, the cell means."""
    maps = []
    for alpha in (alpha_lo, alpha_hi):
        maps.append(torch.cat([background_score(cams, alpha), cams]).numpy().astype(np.float64))
    score = np.concatenate(maps).transpose(1, 2, 0)            # H, W, 2 (K + 1)
    h, w = score.shape[:2]
    ch, cw = max(crop, h), max(crop, w)
    canvas = np.zeros((ch, cw, score.shape[2]))
    canvas[d["oy"]:d["oy"] + h, d["ox"]:d["ox"] + w] = score
    box = canvas[d["cy"]:d["cy"] + crop, d["cx"]:d["cx"] + crop]
    if d["flip"]:
        box = box[:, ::-1]
    n = crop // stride
    out = np.zeros((n, n), np.int64)
    k1 = score.shape[2] // 2
    for i in range(n):
        for j in range(n):
            cell = box[i * stride:(i + 1) * stride, j * stride:(j + 1) * stride].mean(axis=(0, 1))
            lo, hi = int(np.argmax(cell[:k1])), int(np.argmax(cell[k1:]))
            lab = 255 if lo == 0 else lo
            if hi == 0:
                lab = 0
            if cell.max() < 1e-5:           # no score: outside the image
                lab = 255
            out[i, j] = lab
    return out


def test_trainer_labels_equal_the_authors_crop_pool_argmax(tmp_path):
    """From CAMs through the aff_labels stage's shard and the trainer's augmentation, the labels
    AffinityNet trains on equal the authors' pipeline on the same crops (0 cells differ), for
    images smaller and larger than the crop, of sizes not a multiple of 8."""
    g = torch.Generator().manual_seed(0)
    sizes = [(75, 101), (130, 90), (57, 64), (150, 151)]
    data, cams_out = [], []
    all_cams = {}
    for i, (h, w) in enumerate(sizes):
        key = f"img{i}"
        cams = smooth_cams(g, 2, h, w)
        cams = torch.from_numpy(cams.numpy().astype(np.float16).astype(np.float32))  # as stored
        all_cams[key] = cams
        image = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        data.append({"__key__": key, "png": encode_image(image, "png"), "cls.json": encode_json([2, 5])})
        cams_out.append({"__key__": key, "cls.json": encode_json([2, 5]),
                         "cam.npy": encode_npy(cams.numpy())})
    write_shard(tmp_path / "train-000000.tar", data)
    write_shard(tmp_path / "cams.tar", cams_out)
    aff_label_shard(tmp_path / "train-000000.tar", tmp_path / "cams.tar", tmp_path / "aff.tar",
                    4.0, 32.0, crf=None, stride=8)
    crop = 64
    aug = Augment(crop, None, jitter=None, label_stride=8)
    to_training = ToTraining(table.kind("aff").target, 6, aug)
    compared = differ_nearest = cells = 0
    for raw, (lab,) in iter_joined(tmp_path / "train-000000.tar", tmp_path / "aff.tar"):
        s = decode_sample(raw, ["image", "cls"])
        s.update({k: v for k, v in decode_sample(lab, ["aff"]).items() if k != "key"})
        cams = all_cams[s["key"]]
        for trial in range(6):
            seed = f"{s['key']}/{trial}"
            x, y = to_training(s, random.Random(seed))
            d = aug.draw(*s["image"].shape[:2], random.Random(seed))
            ref = authors_cell_labels(cams, 4.0, 32.0, d, crop)
            ids = np.array([0, 2, 5])               # the authors' channel index -> class id
            ref = np.where(ref == 255, 255, ids[np.minimum(ref, 2)])
            assert y.shape == (crop // 8, crop // 8) and x.shape == (3, crop, crop)
            assert np.array_equal(y.numpy(), ref), (s["key"], trial, d)
            compared += 1
            # the image's own pixels land on the same cells: its placement is whole cells
            assert (d["oy"] - d["cy"]) % 8 == 0 and (d["ox"] - d["cx"]) % 8 == 0
            # the labels by nearest neighbour from full resolution (what the trainer saw before)
            full = affinity_labels(cams, 4.0, 32.0, class_ids=[2, 5]).numpy()
            hh, ww = full.shape
            canvas = np.full((max(crop, hh), max(crop, ww)), 255)
            canvas[d["oy"]:d["oy"] + hh, d["ox"]:d["ox"] + ww] = full
            box = canvas[d["cy"]:d["cy"] + crop, d["cx"]:d["cx"] + crop]
            box = box[:, ::-1] if d["flip"] else box
            differ_nearest += int((box[::8, ::8] != ref).sum())
            cells += ref.size
    assert compared == 24
    # the test can fail: the top-left pixel of each cell is not the cell's pooled decision
    assert differ_nearest / cells > 0.02


def test_cell_labels_resize_and_cells_to_pixels():
    lab = torch.tensor([[0, 1], [255, 2]])
    up = cells_to_pixels(lab, 11, 13, 8)
    assert up.shape == (11, 13)
    assert int(up[0, 0]) == 0 and int(up[7, 7]) == 0 and int(up[0, 8]) == 1
    assert int(up[10, 12]) == 2 and int(up[8, 0]) == 255
    try:
        cells_to_pixels(lab, 20, 13, 8)
    except ValueError as e:
        assert "cell grid (3, 2)" in str(e)
    else:
        raise AssertionError("a label of the wrong grid must be refused")


def test_a_label_of_another_stride_is_refused_naming_the_sample():
    aug = Augment(32, None, jitter=None, label_stride=8)
    s = {"key": "k1", "image": np.zeros((40, 40, 3), np.uint8), "aff": np.zeros((40, 40), np.uint8),
         "cls": [1]}
    try:
        ToTraining(table.kind("aff").target, 3, aug)(s, random.Random(0))
    except ValueError as e:
        assert "k1" in str(e) and "cell grid (5, 5)" in str(e)
    else:
        raise AssertionError("full-resolution labels must be refused on a stride-8 trainer")


def naive_authors_loss(feat, lab, r):
    """The authors' pair window: start cells rows [0, H - r + 1), columns [r - 1, W - r + 1);
    offsets (0, 1..r-1) and (1..r-1, -(r-1)..r-1) within the circle; means per term."""
    d = feat.shape[1]
    h, w = lab.shape[-2:]
    offs = [(0, x) for x in range(1, r)] + [(y, x) for y in range(1, r) for x in range(-r + 1, r)
                                             if x * x + y * y < r * r]
    sums = {"bg": 0.0, "fg": 0.0, "neg": 0.0}
    counts = {"bg": 0, "fg": 0, "neg": 0}
    for n in range(feat.shape[0]):
        for y in range(0, h - r + 1):
            for x in range(r - 1, w - r + 1):
                for dy, dx in offs:
                    li, lj = int(lab[n, y, x]), int(lab[n, y + dy, x + dx])
                    if li == 255 or lj == 255:
                        continue
                    wij = math.exp(-float(np.abs(feat[n, :, y, x] - feat[n, :, y + dy, x + dx]).sum()) / d)
                    k = ("bg" if li == 0 else "fg") if li == lj else "neg"
                    sums[k] += -math.log(wij + 1e-5) if k != "neg" else -math.log(1 + 1e-5 - wij)
                    counts[k] += 1
    terms = {k: sums[k] / counts[k] if counts[k] else 0.0 for k in sums}
    return terms["bg"] / 4 + terms["fg"] / 4 + terms["neg"] / 2, counts


def test_the_authors_pair_window():
    g = torch.Generator().manual_seed(3)
    feat = torch.randn(2, 4, 14, 12, generator=g, dtype=torch.float64)
    lab = torch.randint(0, 3, (2, 14, 12), generator=g)
    lab[torch.rand(2, 14, 12, generator=g) < 0.2] = 255
    loss, terms = affinity_loss(feat, lab, radius=5, return_terms=True, border="authors")
    exp, counts = naive_authors_loss(feat.numpy(), lab.numpy(), 5)
    assert loss.item() == pytest.approx(exp, rel=1e-9)
    assert {k: terms[f"n_{k}"] for k in counts} == counts
    # and it is a different loss from all pairs'
    full, fterms = affinity_loss(feat, lab, radius=5, return_terms=True)
    assert sum(fterms[f"n_{k}"] for k in counts) > sum(counts.values())



def test_the_authors_dense_transition_matrix():
    """Their T, naively: pairs (i, i + o) for start cells in their window only, both ways, 1 on
    the diagonal, W ** beta, each row normalised; ours differs only in the border's pairs."""
    from psa_dist.core.random_walk import (
        random_walk,
        random_walk_dense,
        transition_matrix_authors,
        transition_matrix_dense,
    )
    g = torch.Generator().manual_seed(4)
    d, h, w, r, beta = 6, 9, 11, 5, 8.0
    feat = torch.rand(d, h, w, generator=g, dtype=torch.float64)
    offs = [(0, x) for x in range(1, r)] + [(y, x) for y in range(1, r) for x in range(-r + 1, r)
                                             if x * x + y * y < r * r]
    a = np.eye(h * w)
    f = feat.numpy()
    for y in range(0, h - r + 1):
        for x in range(r - 1, w - r + 1):
            for dy, dx in offs:
                wij = math.exp(-np.abs(f[:, y, x] - f[:, y + dy, x + dx]).mean()) ** beta
                a[y * w + x, (y + dy) * w + x + dx] = a[(y + dy) * w + x + dx, y * w + x] = wij
    ref = a / a.sum(axis=1, keepdims=True)
    got = transition_matrix_authors(feat, beta, r)
    assert np.allclose(got.numpy(), ref, rtol=1e-12, atol=1e-15)
    ours = transition_matrix_dense(feat, beta, r).numpy()
    assert not np.allclose(ours, ref)           # the border differs
    cams = torch.rand(3, h, w, generator=g, dtype=torch.float64)
    walked = random_walk_dense(cams, feat, beta, 16, r, border="authors")
    naive = (np.linalg.matrix_power(ref, 16) @ cams.reshape(3, -1).numpy().T).T.reshape(3, h, w)
    assert np.allclose(walked.numpy(), naive, rtol=1e-10)
    # our sparse walk is the dense walk with our T, not theirs
    sparse = random_walk(cams, feat, beta, 16, r)
    assert torch.allclose(sparse, random_walk_dense(cams, feat, beta, 16, r), rtol=1e-8)
