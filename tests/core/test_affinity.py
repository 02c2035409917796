"""affinity_labels and affinity_loss against naive per-pixel references (loops, float64)."""
import math

import numpy as np
import pytest
import torch

from psa_dist import affinity_labels, affinity_loss, neighbor_offsets
from psa_dist.core.affinity import pair_distances


def naive_offsets(r):
    out = []
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if (dy, dx) != (0, 0) and dy * dy + dx * dx < r * r and (dy > 0 or (dy == 0 and dx > 0)):
                out.append((dy, dx))
    return out


@pytest.mark.parametrize("r", [2, 3, 5, 7])
def test_offsets_match_half_plane(r):
    got = neighbor_offsets(r)
    assert sorted(got) == sorted(naive_offsets(r)) and len(set(got)) == len(got)
    assert got[: r - 1] == [(0, dx) for dx in range(1, r)]
    rest = got[r - 1:]
    assert rest == sorted(rest)  # dy = 1..r-1, dx ascending within each row
    # every unordered neighbour pair is covered exactly once
    full = {(dy, dx) for dy, dx in got} | {(-dy, -dx) for dy, dx in got}
    assert len(full) == 2 * len(got)


def test_offsets_radius5_is_34():
    assert len(neighbor_offsets(5)) == 34


def naive_labels(cams, lo, hi):
    c, h, w = cams.shape
    out = np.full((h, w), 255, np.int64)
    for y in range(h):
        for x in range(w):
            v = [float(cams[k, y, x]) for k in range(c)]
            m = max(v) if v else 0.0
            s_lo = [(1 - m) ** lo] + v
            s_hi = [(1 - m) ** hi] + v
            a_lo = max(range(c + 1), key=lambda i: (s_lo[i], -i))
            a_hi = max(range(c + 1), key=lambda i: (s_hi[i], -i))
            if a_lo != 0:
                out[y, x] = a_lo
            if a_hi == 0:
                out[y, x] = 0
    return out


def test_affinity_labels_match_naive():
    g = torch.Generator().manual_seed(0)
    cams = torch.rand(4, 13, 17, generator=g, dtype=torch.float64) ** 3
    cams[2] = 0  # absent class
    got = affinity_labels(cams, 4.0, 32.0)
    exp = naive_labels(cams.numpy(), 4.0, 32.0)
    np.testing.assert_array_equal(got.numpy(), exp)
    assert set(np.unique(exp)) >= {0, 255} and (exp == 3).sum() == 0
    assert ((exp != 0) & (exp != 255)).any()


def test_affinity_labels_class_ids_pool_and_refine():
    g = torch.Generator().manual_seed(1)
    cams = torch.rand(2, 16, 16, generator=g, dtype=torch.float64)
    base = affinity_labels(cams, 4.0, 32.0)
    mapped = affinity_labels(cams, 4.0, 32.0, class_ids=[5, 9])
    lut = torch.tensor([0, 5, 9] + [0] * 252 + [255])
    assert torch.equal(mapped, lut[base])
    # pool: labels of the 4x4-average-pooled score maps, computed naively here
    pooled = affinity_labels(cams, 4.0, 32.0, pool=4)
    assert pooled.shape == (4, 4)
    m = cams.max(0).values
    for alpha, want_bg in ((4.0, False), (32.0, True)):
        s = torch.cat([(1 - m)[None] ** alpha, cams]).reshape(3, 4, 4, 4, 4).mean((2, 4))
        a = s.argmax(0)
        if want_bg:
            assert torch.all(pooled[a == 0] == 0)
        else:
            keep = (a != 0) & ~(torch.cat([(1 - m)[None] ** 32, cams]).reshape(3, 4, 4, 4, 4)
                                .mean((2, 4)).argmax(0) == 0)
            assert torch.equal(pooled[keep], a[keep])
    # refine: a refinement that says "everything is class 2" gives a map of 2s
    def refine(scores):
        out = torch.zeros_like(scores)
        out[2] = 1
        return out
    assert torch.all(affinity_labels(cams, 4.0, 32.0, refine=refine) == 2)


def naive_labelled_pairs(lab, r):
    """(n, y, x, y2, x2, kind) for every in-image pair within r of two non-neutral pixels."""
    b, h, w = lab.shape
    for n in range(b):
        for y in range(h):
            for x in range(w):
                for dy, dx in naive_offsets(r):
                    y2, x2 = y + dy, x + dx
                    if not (0 <= y2 < h and 0 <= x2 < w):
                        continue
                    li, lj = int(lab[n, y, x]), int(lab[n, y2, x2])
                    if li == 255 or lj == 255:
                        continue
                    yield n, y, x, y2, x2, ("bg" if li == 0 else "fg") if li == lj else "neg"


def naive_loss_terms(feat, lab, r):
    d = feat.shape[1]
    sums = {"bg": 0.0, "fg": 0.0, "neg": 0.0}
    counts = {"bg": 0, "fg": 0, "neg": 0}
    for n, y, x, y2, x2, k in naive_labelled_pairs(lab, r):
        wij = math.exp(-float(np.abs(feat[n, :, y, x] - feat[n, :, y2, x2]).sum()) / d)
        sums[k] += -math.log(wij + 1e-5) if k != "neg" else -math.log(1 + 1e-5 - wij)
        counts[k] += 1
    terms = {k: sums[k] / counts[k] if counts[k] else 0.0 for k in sums}
    return terms["bg"] / 4 + terms["fg"] / 4 + terms["neg"] / 2, terms, counts


def test_affinity_loss_matches_naive():
    g = torch.Generator().manual_seed(2)
    feat = torch.randn(2, 5, 9, 8, generator=g, dtype=torch.float64)
    lab = torch.randint(0, 3, (2, 9, 8), generator=g)
    lab[torch.rand(2, 9, 8, generator=g) < 0.3] = 255
    loss, terms = affinity_loss(feat, lab, radius=5, return_terms=True)
    exp, eterms, ecounts = naive_loss_terms(feat.numpy(), lab.numpy(), 5)
    assert loss.item() == pytest.approx(exp, rel=1e-9)
    for k in ("bg", "fg", "neg"):
        assert terms[k] == pytest.approx(eterms[k], rel=1e-9)
        assert terms[f"n_{k}"] == ecounts[k]


def test_affinity_loss_empty_terms_and_gradients():
    feat = torch.randn(1, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    lab = torch.zeros(1, 6, 6, dtype=torch.long)       # only bg+ pairs
    loss, terms = affinity_loss(feat, lab, return_terms=True)
    assert terms["n_fg"] == 0 and terms["n_neg"] == 0 and terms["fg"] == 0.0
    exp, _, _ = naive_loss_terms(feat.detach().numpy(), lab.numpy(), 5)
    assert loss.item() == pytest.approx(exp, rel=1e-9)
    loss.backward()
    assert feat.grad is not None and feat.grad.abs().sum() > 0
    lab2 = torch.full((1, 6, 6), 255)
    assert affinity_loss(feat, lab2).item() == 0.0


def test_loss_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="must match"):
        affinity_loss(torch.randn(1, 4, 6, 6), torch.zeros(1, 5, 6, dtype=torch.long))


def naive_loss_grad(feat, lab, r):
    """d loss / d features of :func:`naive_loss_terms`, by hand, pair by pair (numpy, float64).

    Per pair of term k (weight c_k = 1/4, 1/4, 1/2 over its n_k pairs):
    d(-log(W + eps))/dW = -1/(W + eps), d(-log(1 + eps - W))/dW = 1/(1 + eps - W), and
    dW/df_i = -W sign(f_i - f_j) / D = -dW/df_j, with sign(0) = 0 (autograd's convention for |x|).
    """
    _, _, counts = naive_loss_terms(feat, lab, r)
    d = feat.shape[1]
    weight = {"bg": 0.25, "fg": 0.25, "neg": 0.5}
    grad = np.zeros_like(feat)
    for n, y, x, y2, x2, k in naive_labelled_pairs(lab, r):
        diff = feat[n, :, y, x] - feat[n, :, y2, x2]
        wij = math.exp(-float(np.abs(diff).sum()) / d)
        c = weight[k] / counts[k]
        dl_dw = -c / (wij + 1e-5) if k != "neg" else c / (1 + 1e-5 - wij)
        g = dl_dw * -wij * np.sign(diff) / d
        grad[n, :, y, x] += g
        grad[n, :, y2, x2] -= g
    return grad


def small_labels(g):
    """(2, 7, 9) labels with every kind of pixel: neutral, background, two classes."""
    lab = torch.tensor([0, 1, 2, 255])[torch.randint(0, 4, (2, 7, 9), generator=g)]
    lab[0, 0, :4] = torch.tensor([0, 1, 2, 255])
    return lab


@pytest.mark.parametrize("features", ["continuous", "ties"])
def test_affinity_loss_gradient_matches_naive(features):
    g = torch.Generator().manual_seed(3)
    if features == "continuous":
        feat = torch.randn(2, 3, 7, 9, generator=g, dtype=torch.float64)
    else:
        # Few distinct values: many channels of many pairs are exactly equal (sign 0), and whole
        # pixels repeat (distance 0, W = 1 exactly).
        feat = torch.randint(-1, 2, (2, 3, 7, 9), generator=g).double() / 2
        feat[:, :, 3] = feat[:, :, 2]
    lab = small_labels(g)
    x = feat.clone().requires_grad_()
    loss, terms = affinity_loss(x, lab, radius=5, return_terms=True)
    loss.backward()
    exp, eterms, ecounts = naive_loss_terms(feat.numpy(), lab.numpy(), 5)
    assert loss.item() == pytest.approx(exp, rel=1e-12)
    for k in ("bg", "fg", "neg"):
        assert terms[f"n_{k}"] == ecounts[k] > 0
        assert terms[k] == pytest.approx(eterms[k], rel=1e-12)
    want = naive_loss_grad(feat.numpy(), lab.numpy(), 5)
    if features == "ties":
        assert (want == 0).any() and np.abs(want).sum() > 0
    np.testing.assert_allclose(x.grad.numpy(), want, rtol=1e-10, atol=1e-15)


def naive_pair_distances(feat, offsets):
    b, d, h, w = feat.shape
    out = np.zeros((b, len(offsets), h, w))
    for n in range(b):
        for k, (dy, dx) in enumerate(offsets):
            for y in range(h):
                for x in range(w):
                    if 0 <= y + dy < h and 0 <= x + dx < w:
                        out[n, k, y, x] = np.abs(feat[n, :, y, x] - feat[n, :, y + dy, x + dx]).mean()
    return out


# block sizes in elements of the (2, 3, 44) flat buffer of radius 3: the whole batch, one image
# (132 elements), one channel of one image
@pytest.mark.parametrize("block", [None, 150, 1])
def test_pair_distances_values_and_gradcheck(block):
    g = torch.Generator().manual_seed(4)
    feat = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    offsets = neighbor_offsets(3)
    got = pair_distances(feat, offsets, block)
    np.testing.assert_allclose(got.numpy(), naive_pair_distances(feat.numpy(), offsets), rtol=1e-12)
    # radius 5 on a 4 x 5 grid: some offsets have no pair at all
    far = neighbor_offsets(5)
    np.testing.assert_allclose(pair_distances(feat, far, block).numpy(),
                               naive_pair_distances(feat.numpy(), far), rtol=1e-12)
    x = feat.clone().requires_grad_()
    # fast mode (random projections of the Jacobians): a few backward calls instead of one per output
    assert torch.autograd.gradcheck(lambda f: pair_distances(f, offsets, block), (x,), fast_mode=True)


def test_pair_distances_rejects_offsets_outside_the_half_plane():
    with pytest.raises(ValueError, match="half-plane"):
        pair_distances(torch.zeros(1, 2, 4, 4), [(0, 1), (0, -1)])
