"""Multi-scale CAM inference against a per-pass loop written here; the dense CRF's behaviour."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from psa_dist import cam_multiscale, cam_multiscale_batch, cam_to_label, crf_refine, rw_to_label


class TinyCamNet(nn.Module):
    """A deliberately flip-asymmetric stride-8 'classifier' for testing CAM inference."""

    def __init__(self, c=4):
        super().__init__()
        torch.manual_seed(0)
        self.num_classes = c
        self.conv = nn.Conv2d(3, c, (3, 5), stride=8, padding=(1, 2))

    def cams(self, x):
        return F.relu(self.conv(x))


def naive_cams(model, image, present, scales, flip):
    h, w = image.shape[-2:]
    total = torch.zeros(model.num_classes, h, w)
    for s in scales:
        size = (max(1, round(h * s)), max(1, round(w * s)))
        x = image[None] if s == 1.0 else F.interpolate(image[None], size=size, mode="bilinear",
                                                       align_corners=False)
        passes = [(x, False)] + ([(torch.flip(x, [-1]), True)] if flip else [])
        for xi, flipped in passes:
            c = F.interpolate(model.cams(xi), size=(h, w), mode="bilinear", align_corners=False)[0]
            total += torch.flip(c, [-1]) if flipped else c
    for k in range(model.num_classes):
        if k + 1 not in present:
            total[k] = 0
        total[k] = total[k] / (total[k].max() + 1e-5)
    return total


@pytest.mark.parametrize("flip", [True, False])
def test_cam_multiscale_matches_loop(flip):
    model = TinyCamNet()
    img = torch.randn(3, 37, 45)
    got = cam_multiscale(model, img, [1, 3], scales=(1.0, 0.5, 1.5, 2.0), flip=flip)
    exp = naive_cams(model, img, [1, 3], (1.0, 0.5, 1.5, 2.0), flip)
    assert got.shape == (4, 37, 45)
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)
    assert got[1].abs().max() == 0 and got[3].abs().max() == 0
    assert 0.99 < got[0].max() <= 1.0


def test_cam_flip_invariance_and_batch():
    model = TinyCamNet()
    img = torch.randn(3, 33, 40)
    a = cam_multiscale(model, img, [1, 2, 3, 4])
    b = cam_multiscale(model, torch.flip(img, [-1]), [1, 2, 3, 4])
    torch.testing.assert_close(torch.flip(b, [-1]), a, rtol=1e-4, atol=1e-5)
    imgs = torch.randn(3, 3, 24, 32)
    hot = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    batch = cam_multiscale_batch(model, imgs, hot)
    for i in range(3):
        torch.testing.assert_close(batch[i], cam_multiscale(model, imgs[i], hot[i]), rtol=1e-5, atol=1e-6)


def test_cam_and_rw_to_label():
    cams = torch.tensor([[[0.1, 0.5], [0.9, 0.0]], [[0.3, 0.1], [0.95, 0.0]]])
    lab = cam_to_label(cams, [4, 7], bg_score=0.2)
    assert lab.tolist() == [[7, 4], [7, 0]]
    walked = torch.cat([torch.full((1, 2, 2), 0.2), cams])
    assert rw_to_label(walked, [4, 7]).tolist() == [[7, 4], [7, 0]]


def test_crf_follows_colour_edges_and_cleans_noise():
    h, w = 24, 32
    img = np.zeros((h, w, 3), np.uint8)
    img[:, :16] = (200, 40, 40)
    img[:, 16:] = (40, 40, 200)
    rng = np.random.default_rng(0)
    # Noisy unary: 70% right on each side, the rest flipped.
    truth = np.zeros((h, w), int)
    truth[:, 16:] = 1
    noisy = np.where(rng.random((h, w)) < 0.3, 1 - truth, truth)
    probs = np.stack([np.where(noisy == 0, 0.6, 0.4), np.where(noisy == 1, 0.6, 0.4)]).astype(np.float32)
    q = crf_refine(img, probs)
    assert q.shape == (2, h, w)
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-4)
    assert (q.argmax(0) == truth).mean() > 0.97 > (noisy == truth).mean()
    qt = crf_refine(torch.from_numpy(img), torch.from_numpy(probs))
    assert isinstance(qt, torch.Tensor) and np.allclose(qt.numpy(), q, atol=1e-6)


def test_crf_missing_is_a_clear_error(monkeypatch):
    import builtins
    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("pydensecrf"):
            raise ImportError("no module")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match=r"psa-dist\[crf\]"):
        crf_refine(np.zeros((4, 4, 3), np.uint8), np.full((2, 4, 4), 0.5, np.float32))


def test_perfect_walk_label_is_the_region_mean_argmax():
    from psa_dist.stages.evaluate import perfect_walk_label
    g = torch.Generator().manual_seed(3)
    gt = torch.zeros(6, 8, dtype=torch.long)
    gt[1:5, 1:4] = 2          # object of class 2: CAM weak on most of it, strong on one pixel
    gt[2:4, 5:8] = 5
    cams = torch.rand(2, 6, 8, generator=g) * 0.3     # channels: classes 2 and 5
    cams[0, 1, 1] = 1.0
    got = perfect_walk_label(cams, [2, 5], gt, bg_alpha=4.0)
    # naive: per pixel, average each map over all pixels sharing its ground-truth value
    maps = torch.cat([(1 - cams.max(0).values)[None] ** 4.0, cams])
    lut = [0, 2, 5]
    for y in range(6):
        for x in range(8):
            same = [(yy, xx) for yy in range(6) for xx in range(8) if gt[yy, xx] == gt[y, x]]
            mean = [sum(float(maps[c, yy, xx]) for yy, xx in same) / len(same) for c in range(3)]
            assert int(got[y, x]) == lut[max(range(3), key=lambda c: mean[c])]


def test_walk_with_crf_snaps_the_label_to_the_colour_edge():
    # An object filling the left half in its own colour; its CAM fades out well past the edge. The
    # walked maps' argmax follows the CAM; with random_walk.crf the dense CRF moves the boundary to
    # the colour edge (the paper's CAM + RW + dCRF labels).
    from psa_dist.config import ModelConfig
    from psa_dist.stages.label_stages.random_walk import walk_images
    from psa_dist.nets.models import AffinityNet, build_classifier
    torch.manual_seed(0)
    aff = AffinityNet.from_classifier(build_classifier(ModelConfig(backbone="small"), 1),
                                      dims=(4, 4, 4, 4), stride=4).eval()
    img = np.full((48, 64, 3), 110, np.uint8)
    img[:, :32] = (200, 40, 40)
    cam = torch.zeros(1, 48, 64)
    cam[0, :, :26] = 1.0
    cam[0, :, 26:44] = torch.linspace(1.0, 0.0, 18)
    truth = torch.zeros(48, 64, dtype=torch.long)
    truth[:, :32] = 3
    settings = {"iters": 10, "gauss_sxy": 3.0, "gauss_compat": 3.0, "bi_sxy": 20.0,
                "bi_srgb": 13.0, "bi_compat": 10.0}
    plain = walk_images(aff, [img], [cam], [[3]], t=2, tol=1e-5)[0]
    refined = walk_images(aff, [img], [cam], [[3]], t=2, tol=1e-5, crf=settings)[0]
    assert set(refined.unique().tolist()) <= {0, 3}
    wrong_plain, wrong_crf = int((plain != truth).sum()), int((refined != truth).sum())
    assert wrong_plain >= 48 * 3                    # the CAM's boundary is columns off
    assert wrong_crf < wrong_plain / 4, (wrong_plain, wrong_crf)


def test_distrust_background_matches_a_pixel_loop():
    from psa_dist.core.cam import distrust_background
    rng = np.random.default_rng(3)
    for trial in range(40):
        lab = rng.choice([0, 1, 3, 5, 255], size=(9, 11), p=[0.5, 0.2, 0.15, 0.1, 0.05])
        if trial % 4 == 0:
            lab[lab == 3] = 0                       # class 3 named by the image label, lost
        ids = [1, 3]
        frac = [0.0, 0.01, 0.1, 0.3][trial % 4]
        # naive: count every class pixel by hand over the labelled (non-ignore) pixels
        n = sum(1 for v in lab.flat if v != 255)
        counts = {c: sum(1 for v in lab.flat if v == c) for c in ids}
        bad = any(counts[c] < frac * n for c in ids)
        want = np.array([[255 if (bad and v == 0) else v for v in row] for row in lab])
        got = distrust_background(torch.from_numpy(lab), ids, frac)
        assert np.array_equal(got.numpy(), want), (trial, frac, counts)
    # an image whose every class is well covered is returned unchanged; class pixels always kept
    lab = torch.tensor([[0, 0, 2], [2, 2, 0]])
    assert torch.equal(distrust_background(lab, [2], 0.4), lab)
    assert distrust_background(lab, [2, 4], 0.01).tolist() == [[255, 255, 2], [2, 2, 255]]
