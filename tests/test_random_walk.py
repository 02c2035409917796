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
