"""The sparse random walk against a dense, naive transition matrix built here with loops."""
import math

import numpy as np
import pytest
import torch

from psa_dist import random_walk, random_walk_dense, transition_weights


def naive_transition(feat, beta, r):
    """T = D^-1 W^beta over all pairs closer than r (both directions and the pixel itself)."""
    d, h, w = feat.shape
    n = h * w
    wm = np.zeros((n, n))
    for y in range(h):
        for x in range(w):
            for y2 in range(h):
                for x2 in range(w):
                    if (y - y2) ** 2 + (x - x2) ** 2 < r * r:
                        dist = np.abs(feat[:, y, x] - feat[:, y2, x2]).sum() / d
                        wm[y * w + x, y2 * w + x2] = math.exp(-dist) ** beta
    return wm / wm.sum(1, keepdims=True)


@pytest.mark.parametrize("h,w,r,beta,t", [(7, 9, 5, 8.0, 256), (6, 5, 3, 2.0, 7), (11, 4, 5, 4.0, 33)])
def test_random_walk_matches_dense_matrix_power(h, w, r, beta, t):
    g = torch.Generator().manual_seed(h * w)
    feat = torch.randn(6, h, w, generator=g, dtype=torch.float64) * 0.4
    cams = torch.rand(3, h, w, generator=g, dtype=torch.float64)
    tm = naive_transition(feat.numpy(), beta, r)
    exp = (np.linalg.matrix_power(tm, t) @ cams.reshape(3, -1).numpy().T).T.reshape(3, h, w)
    got64 = random_walk(cams, feat, beta=beta, t=t, radius=r)
    np.testing.assert_allclose(got64.numpy(), exp, rtol=1e-9, atol=1e-12)
    got32 = random_walk(cams.float(), feat.float(), beta=beta, t=t, radius=r)
    np.testing.assert_allclose(got32.numpy(), exp, rtol=1e-5, atol=1e-6)
    dense = random_walk_dense(cams, feat, beta=beta, t=t, radius=r)
    np.testing.assert_allclose(dense.numpy(), exp, rtol=1e-9, atol=1e-12)


def test_transition_rows_sum_to_one_and_match_naive():
    g = torch.Generator().manual_seed(3)
    feat = torch.randn(4, 10, 9, generator=g, dtype=torch.float64)
    wts = transition_weights(feat[None], beta=3.0, radius=5)
    assert wts.shape == (1, 69, 10, 9)
    torch.testing.assert_close(wts.sum(1), torch.ones(1, 10, 9, dtype=torch.float64))
    # interior pixel: all 69 links present; corner pixel: only those inside the image
    assert (wts[0, :, 5, 4] > 0).sum() == 69
    tm = naive_transition(feat.numpy(), 3.0, 5)
    assert (wts[0, :, 0, 0] > 0).sum() == (tm[0] > 0).sum()
    np.testing.assert_allclose(np.sort(wts[0, :, 0, 0].numpy())[::-1][: (tm[0] > 0).sum()],
                               np.sort(tm[0][tm[0] > 0])[::-1], rtol=1e-12)


def test_constant_map_is_a_fixed_point():
    feat = torch.randn(5, 10, 12, dtype=torch.float64)
    c = torch.full((2, 10, 12), 0.37, dtype=torch.float64)
    torch.testing.assert_close(random_walk(c, feat, t=64), c, rtol=1e-12, atol=1e-12)


def test_batched_equals_per_image():
    g = torch.Generator().manual_seed(5)
    feat = torch.randn(3, 4, 9, 10, generator=g)
    cams = torch.rand(3, 2, 9, 10, generator=g)
    batched = random_walk(cams, feat, t=20)
    for i in range(3):
        torch.testing.assert_close(batched[i], random_walk(cams[i], feat[i], t=20))


def test_walk_of_images_of_different_sizes_in_one_batch_matches_naive():
    # random_walk_many pads the batch: each image must still get exactly its own T^t (naive matrix).
    from psa_dist.core.random_walk import random_walk_many
    g = torch.Generator().manual_seed(11)
    shapes = [(2, 5, 7), (4, 8, 6), (1, 3, 9)]          # (channels, h, w): all three differ
    feats = [torch.randn(5, h, w, generator=g, dtype=torch.float64) * 0.5 for _, h, w in shapes]
    cams = [torch.rand(c, h, w, generator=g, dtype=torch.float64) for c, h, w in shapes]
    got = random_walk_many(cams, feats, beta=6.0, t=19, radius=4)
    for out, f, c in zip(got, feats, cams):
        tm = naive_transition(f.numpy(), 6.0, 4)
        exp = (np.linalg.matrix_power(tm, 19) @ c.reshape(c.shape[0], -1).numpy().T).T
        assert out.shape == c.shape
        np.testing.assert_allclose(out.numpy(), exp.reshape(c.shape), rtol=1e-9, atol=1e-12)
    assert random_walk_many([], []) == []
    with pytest.raises(ValueError, match="spatial"):
        random_walk_many([cams[0]], [feats[1]])


def test_walk_stays_inside_an_affinity_region():
    # Two regions of identical features separated by a sharp feature edge: mass spreads within the
    # left region and barely crosses.
    feat = torch.zeros(4, 8, 16)
    feat[:, :, 8:] = 5.0
    cam = torch.zeros(1, 8, 16)
    cam[0, 3, 1] = 1.0
    out = random_walk(cam, feat, beta=8, t=200)
    assert out[0, :, :8].min() > 0.5 * out[0, :, :8].max()
    assert out[0, :, 8:].max() < 1e-6


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="spatial"):
        random_walk(torch.rand(2, 5, 5), torch.rand(3, 5, 6))


@pytest.mark.parametrize("stride,tol", [(8, 0.0), (4, 1e-5)])
def test_walk_images_batch_equals_one_by_one(stride, tol):
    # The label stage walks several images together; sizes not multiples of 8 exercise the padding.
    from psa_dist.config import ModelConfig
    from psa_dist.stages.label_stages.random_walk import walk_images
    from psa_dist.nets.models import AffinityNet, build_classifier
    torch.manual_seed(0)
    aff = AffinityNet.from_classifier(build_classifier(ModelConfig(backbone="small"), 3),
                                      dims=(4, 4, 4, 4), stride=stride).eval()
    rng = np.random.default_rng(0)
    sizes, ids = [(37, 50), (64, 41), (24, 24)], [[1], [2, 3], [3]]
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    cams = [torch.rand(len(c), h, w) for c, (h, w) in zip(ids, sizes)]
    together = walk_images(aff, images, cams, ids, t=40, tol=tol)
    for img, cam, c, lab in zip(images, cams, ids, together):
        alone = walk_images(aff, [img], [cam], [c], t=40, tol=tol)[0]
        assert lab.shape == img.shape[:2] and torch.equal(lab, alone)
        assert set(lab.unique().tolist()) <= {0, *c}


def naive_walk_label(feat, cam, ids, beta, t, r, bg_alpha):
    """The authors' infer_aff for one image, written out with numpy and the dense T above: the
    background score at full resolution, zero-pad to a multiple of 8, mean over each cell, T^t,
    bilinear upsampling (half-pixel centres), crop, argmax."""
    k, h, w = cam.shape
    maps = np.concatenate([(1 - cam.max(0, keepdims=True)) ** bg_alpha, cam])
    ph, pw = (-h) % 8, (-w) % 8
    maps = np.pad(maps, ((0, 0), (0, ph), (0, pw)))
    gh, gw = feat.shape[1:]
    cell = (h + ph) // gh
    pooled = maps.reshape(k + 1, gh, cell, gw, cell).mean((2, 4))
    tm = np.linalg.matrix_power(naive_transition(feat, beta, r), t)
    walked = (tm @ pooled.reshape(k + 1, -1).T).T.reshape(k + 1, gh, gw)
    up = torch.nn.functional.interpolate(torch.from_numpy(walked)[None], size=(h + ph, w + pw),
                                         mode="bilinear", align_corners=False)[0].numpy()
    return np.array([0, *ids])[up[:, :h, :w].argmax(0)]


@pytest.mark.parametrize("stride", [8, 4])
def test_walk_labels_match_the_authors_steps(stride):
    from psa_dist.core.pseudo_labels import walk_labels
    g = torch.Generator().manual_seed(stride)
    sizes, ids = [(37, 50), (24, 17)], [[2], [1, 3]]
    feats, cams = [], []
    for (h, w), c in zip(sizes, ids):
        gh, gw = -(-h // 8) * 8 // stride, -(-w // 8) * 8 // stride
        feats.append(torch.randn(5, gh, gw, generator=g, dtype=torch.float64) * 0.3)
        blob = torch.rand(len(c), 1, 1, generator=g, dtype=torch.float64)
        cams.append(torch.rand(len(c), h, w, generator=g, dtype=torch.float64) * blob)
    got = walk_labels(feats, cams, ids, beta=4.0, t=9, radius=3, bg_alpha=2.0)
    for lab, f, cam, c in zip(got, feats, cams, ids):
        ref = naive_walk_label(f.numpy(), cam.numpy(), c, 4.0, 9, 3, 2.0)
        assert lab.shape == cam.shape[1:] and (lab.numpy() == ref).mean() > 0.999


def test_walk_labels_refine_sees_normalised_scores_and_sets_the_argmax():
    from psa_dist.core.pseudo_labels import walk_labels
    feat, cam = torch.zeros(4, 2, 2), torch.full((1, 16, 16), 0.9)
    seen = []

    def refine(p):
        seen.append(p)
        return torch.stack([torch.ones_like(p[0]), torch.zeros_like(p[0])])   # all background
    plain, refined = walk_labels([feat, feat], [cam, cam], [[5], [5]], t=3,
                                 refine=[None, refine])
    assert (plain == 5).all() and (refined == 0).all()
    assert torch.allclose(seen[0].sum(0), torch.ones(16, 16), atol=1e-4)
    with pytest.raises(ValueError, match="one of each per image"):
        walk_labels([feat], [cam, cam], [[5]])


def test_chebyshev_coefficients_rebuild_the_power():
    # Independent check: numpy's Chebyshev series evaluation of the coefficients equals x^t.
    from numpy.polynomial import chebyshev
    from psa_dist.core.random_walk import chebyshev_power_coefficients
    x = np.linspace(-1, 1, 201)
    for t in (0, 1, 2, 7, 64, 256):
        c = np.array(chebyshev_power_coefficients(t))
        assert c.shape == (t + 1,) and (c >= 0).all() and abs(c.sum() - 1) < 1e-12
        np.testing.assert_allclose(chebyshev.chebval(x, c), x ** t, atol=1e-12)
        if t % 2 == 0:
            assert (c[1::2] == 0).all()          # an even power has no odd terms


@pytest.mark.parametrize("tol", [1e-2, 1e-4])
def test_chebyshev_degree_bounds_the_truncation_error(tol):
    from numpy.polynomial import chebyshev
    from psa_dist.core.random_walk import chebyshev_degree, chebyshev_power_coefficients
    t, n, k = 256, 400, 69
    d = chebyshev_degree(t, tol, n, k)
    assert 0 < d < t
    c = np.array(chebyshev_power_coefficients(t))
    x = np.linspace(-1, 1, 4001)
    err = np.abs(chebyshev.chebval(x, c[:d + 1]) - x ** t).max()
    assert err <= tol / math.sqrt(n * k)
    # and the degree is the smallest that does it: one order lower is off by more at x = 1
    assert abs(chebyshev.chebval(1.0, c[:d]) - 1.0) > tol / math.sqrt(n * k)
    assert chebyshev_degree(t, 0.0, n, k) == t


@pytest.mark.parametrize("tol", [1e-1, 1e-3, 1e-6])
def test_truncated_walk_is_within_tol_of_the_exact_power(tol):
    # Float64, so the difference measured is the truncation alone; at tol 0.1 the truncation is
    # large enough (degree ~40 of 256) that the bound is really exercised.
    from psa_dist.core.random_walk import chebyshev_degree
    h, w, r, beta, t = 9, 11, 5, 2.0, 256
    g = torch.Generator().manual_seed(7)
    feat = torch.randn(6, h, w, generator=g, dtype=torch.float64) * 0.3
    cams = torch.rand(3, h, w, generator=g, dtype=torch.float64)
    cams[1] *= 0.01                               # the bound is per channel: relative to its max
    tm = naive_transition(feat.numpy(), beta, r)
    exp = (np.linalg.matrix_power(tm, t) @ cams.reshape(3, -1).numpy().T).T.reshape(3, h, w)
    got = random_walk(cams, feat, beta=beta, t=t, radius=r, tol=tol).numpy()
    err = np.abs(got - exp).reshape(3, -1).max(1)
    assert (err <= tol * cams.reshape(3, -1).amax(1).numpy()).all(), err
    assert chebyshev_degree(t, tol, h * w, 69) < t
    if tol >= 1e-3:
        assert err.max() > 1e-13                  # a real truncation, not the exact power


def test_truncated_walk_of_a_padded_batch_equals_each_image_alone():
    # Images of different sizes get different degrees inside one batch; each must equal its walk
    # alone bit for bit (its result may not depend on the batch it is in), and be within tol.
    from psa_dist.core.random_walk import random_walk_many
    g = torch.Generator().manual_seed(2)
    shapes = [(2, 5, 7), (3, 12, 10), (1, 3, 9)]
    feats = [torch.randn(5, h, w, generator=g) * 0.5 for _, h, w in shapes]
    cams = [torch.rand(c, h, w, generator=g) for c, h, w in shapes]
    got = random_walk_many(cams, feats, beta=6.0, t=128, radius=4, tol=1e-4)
    for out, f, c in zip(got, feats, cams):
        alone = random_walk(c, f, beta=6.0, t=128, radius=4, tol=1e-4)
        assert torch.equal(out, alone)
        tm = naive_transition(f.double().numpy(), 6.0, 4)
        exp = (np.linalg.matrix_power(tm, 128) @ c.double().reshape(c.shape[0], -1).numpy().T).T
        assert np.abs(out.double().numpy() - exp.reshape(c.shape)).max() <= 1e-4 + 1e-5
