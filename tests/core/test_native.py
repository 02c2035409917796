"""The C kernels of psa_dist.core.native against naive loops written here (numpy, float64), and the
torch fallback where no compiler is found."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from psa_dist import random_walk
from psa_dist.core import native
from psa_dist.core.affinity import neighbor_offsets, pair_distances

# Shifts of both signs (the walk reads neighbours before and after a pixel), a length that is no
# multiple of the kernel's pixel block, and 1 or 2 threads (the pixels or channels split up).
SHIFTS = [1, 5, 17, -3, -19, 40]
START, N = 20, 3 * native.BLOCK + 37


def naive_mean_l1(buf, start, n, shifts):
    b, d, _ = buf.shape
    out = np.zeros((b, len(shifts), n))
    for i in range(b):
        for k, q in enumerate(shifts):
            for p in range(n):
                out[i, k, p] = np.abs(buf[i, :, start + p] - buf[i, :, start + p + q]).sum() / d
    return out


def naive_mean_l1_grad(buf, start, n, shifts, g):
    """d sum(out * g) / d buf, pair by pair; sign(0) = 0 as autograd's abs."""
    b, d, _ = buf.shape
    grad = np.zeros_like(buf)
    for i in range(b):
        for k, q in enumerate(shifts):
            for p in range(n):
                s = np.sign(buf[i, :, start + p] - buf[i, :, start + p + q]) * g[i, k, p] / d
                grad[i, :, start + p] += s
                grad[i, :, start + p + q] -= s
    return grad


def test_kernel_is_built_here():
    # CI and the README's set-up have a C compiler: the fast path must be the one tested.
    assert native.available(), "the C kernel did not build (see the message on stderr)"
    assert native.library_path().is_file()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_pair_mean_l1_and_backward_match_naive(threads, ties):
    g = torch.Generator().manual_seed(0)
    length = START + N + max(SHIFTS)
    if ties:    # few distinct values: many channel differences are exactly 0 (sign 0)
        buf = torch.randint(-1, 2, (2, 3, length), generator=g).float() / 2
    else:
        buf = torch.randn(2, 3, length, generator=g)
    grad = torch.randn(2, len(SHIFTS), N, generator=g)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = native.pair_mean_l1(buf, START, N, SHIFTS)
        gbuf = native.pair_mean_l1_backward(buf, START, N, SHIFTS, grad)
    finally:
        torch.set_num_threads(old)
    b64 = buf.double().numpy()
    np.testing.assert_allclose(out.numpy(), naive_mean_l1(b64, START, N, SHIFTS), atol=1e-6)
    want = naive_mean_l1_grad(b64, START, N, SHIFTS, grad.double().numpy())
    if ties:
        assert (want == 0).sum() > 0
    np.testing.assert_allclose(gbuf.numpy(), want, atol=1e-5)


def test_pair_mean_l1_rejects_reads_outside_the_buffer():
    buf = torch.zeros(1, 2, 50)
    with pytest.raises(ValueError, match="leave the buffer of length 50"):
        native.pair_mean_l1(buf, 5, 40, [1, 6])
    with pytest.raises(ValueError, match="float32"):
        native.pair_mean_l1(buf.double(), 5, 10, [1])


def test_loss_distances_in_float32_use_the_kernel_and_match_naive():
    """pair_distances (AffinityNet's loss) in float32 on the CPU: forward and backward."""
    g = torch.Generator().manual_seed(1)
    feat = torch.randn(2, 6, 7, 9, generator=g)
    offsets = neighbor_offsets(5)
    weight = torch.randn(2, len(offsets), 7, 9, generator=g)
    x = feat.clone().requires_grad_()
    (pair_distances(x, offsets) * weight).sum().backward()
    f64, w64 = feat.double().numpy(), weight.double().numpy()
    want = np.zeros((2, len(offsets), 7, 9))
    grad = np.zeros_like(f64)
    for i in range(2):
        for k, (dy, dx) in enumerate(offsets):
            for y in range(7):
                for xx in range(9):
                    if y + dy < 7 and 0 <= xx + dx < 9:
                        diff = f64[i, :, y, xx] - f64[i, :, y + dy, xx + dx]
                        want[i, k, y, xx] = np.abs(diff).mean()
                        s = np.sign(diff) * w64[i, k, y, xx] / 6
                        grad[i, :, y, xx] += s
                        grad[i, :, y + dy, xx + dx] -= s
    np.testing.assert_allclose(pair_distances(feat, offsets).numpy(), want, atol=1e-6)
    np.testing.assert_allclose(x.grad.numpy(), grad, atol=1e-5)


def naive_walk(feat, cams, beta, r, t):
    """T^t cams with test_random_walk's dense, naive T, as a matrix power (float64)."""
    from tests.core.test_random_walk import naive_transition
    tm = naive_transition(feat, beta, r)
    return (np.linalg.matrix_power(tm, t) @ cams.reshape(cams.shape[0], -1).T).T.reshape(cams.shape)


@pytest.mark.parametrize("threads", [1, 2])
def test_float32_walk_uses_the_kernels_and_matches_the_dense_power(threads):
    """The walk in float32 on the CPU (C distances and C Chebyshev steps) against T^t in float64;
    a grid wider than one pixel block so that the threads split it."""
    g = torch.Generator().manual_seed(2)
    h, w = 9, 31                                  # 9 x (31 + 8) padded cells: 3 blocks of 128
    feat = torch.randn(5, h, w, generator=g) * 0.3
    cams = torch.rand(3, h, w, generator=g)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = random_walk(cams, feat, beta=6.0, t=64, radius=5, tol=1e-6)
        batch = random_walk(torch.stack([cams, cams]), torch.stack([feat, feat]), beta=6.0, t=64,
                            radius=5, tol=1e-6)
    finally:
        torch.set_num_threads(old)
    want = naive_walk(feat.double().numpy(), cams.double().numpy(), 6.0, 5, 64)
    assert np.abs(got.double().numpy() - want).max() < 1e-5
    assert torch.equal(batch[0], got) and torch.equal(batch[1], got)


def _in_subprocess(env: dict) -> dict:
    code = ("import json, torch; from psa_dist import transition_weights; "
            "from psa_dist.core import native; "
            "g = torch.Generator().manual_seed(3); f = torch.randn(1, 7, 6, 8, generator=g); "
            "print(json.dumps({'available': native.available(), "
            "'weights': transition_weights(f, 8.0, 5).flatten().tolist()}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "stderr": proc.stderr}


def test_without_a_compiler_torch_ops_give_the_same_weights(tmp_path):
    built = _in_subprocess({"PSA_DIST_CACHE": str(tmp_path / "fresh")})
    assert built["available"] and list((tmp_path / "fresh").glob("pair_l1-*.so"))
    none = _in_subprocess({"PSA_DIST_CACHE": str(tmp_path / "none"), "CC": "no-such-cc"})
    assert not none["available"]
    assert "unavailable" in none["stderr"] and "no-such-cc" in none["stderr"]
    np.testing.assert_allclose(none["weights"], built["weights"], rtol=1e-5, atol=1e-7)
    off = _in_subprocess({"PSA_DIST_NATIVE": "0"})
    assert not off["available"] and off["stderr"] == ""
    np.testing.assert_allclose(off["weights"], built["weights"], rtol=1e-5, atol=1e-7)


def test_images_of_different_sizes_in_one_batch_match_each_alone():
    """random_walk_many in float32: padded grids through the C step give each image's own walk."""
    from psa_dist.core.random_walk import random_walk_many
    g = torch.Generator().manual_seed(5)
    shapes = [(2, 6, 9), (3, 11, 7), (1, 1, 1), (2, 4, 40)]    # a 1x1 map has no links at all
    feats = [torch.randn(4, h, w, generator=g) * 0.4 for _, h, w in shapes]
    cams = [torch.rand(c, h, w, generator=g) for c, h, w in shapes]
    many = random_walk_many(cams, feats, beta=8.0, t=32, radius=5, tol=1e-6)
    for m, c, f in zip(many, cams, feats):
        assert torch.equal(m, random_walk(c, f, beta=8.0, t=32, radius=5, tol=1e-6))
        want = naive_walk(f.double().numpy(), c.double().numpy(), 8.0, 5, 32)
        assert np.abs(m.double().numpy() - want).max() < 1e-5


def test_kernels_work_in_a_forked_child():
    """The thread pool of a parent that used it is rebuilt in a fork-started child (DataLoader
    workers, fork pools): the child's call must return, with the parent's result."""
    import multiprocessing as mp
    g = torch.Generator().manual_seed(6)
    buf = torch.randn(1, 3, START + N + max(SHIFTS), generator=g)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = native.pair_mean_l1(buf, START, N, SHIFTS)     # the parent's pool now exists
        with mp.get_context("fork").Pool(1) as pool:
            got = pool.apply_async(_child_distances, (buf, 2)).get(timeout=60)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(got, want)


def _child_distances(buf, threads):
    torch.set_num_threads(threads)
    return native.pair_mean_l1(buf, START, N, SHIFTS)
