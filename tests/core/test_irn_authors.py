"""IRN's semantic path against the authors' computations (jiwoon-ahn/irn), each rewritten here from
their code as they compute it: the path indices and the affinity from a boundary map
(``misc/indexing.py``: ``PathIndex``, ``edge_to_affinity``), the pair labels and the loss
(``voc12/dataloader.py``, ``net/resnet50_irn.py``), the walk with their padded dense transition
matrix squared ``exp_times`` times (``indexing.propagate_to_edge``), the relation labels from CAMs
with the dense CRF on hard labels (``step/cam_to_ir_label.py``, ``imutils.crf_inference_label``),
the labels from walked maps (``step/make_sem_seg_labels.py``) and the label reduction to stride 4
(PIL's nearest resize)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from psa_dist.core.affinity import neighbor_offsets, pair_label_masks, relation_loss
from psa_dist.core.boundary import (boundary_affinity, boundary_walk, boundary_walk_dense_authors,
                                    confident_labels, reduce_labels, walk_to_label)
from psa_dist.core.crf import crf_labels


# ----------------------------------------------------------------------------- the authors' code
def authors_directions(radius):
    dst = [(0, x) for x in range(1, radius)]
    for y in range(1, radius):
        for x in range(-radius + 1, radius):
            if x * x + y * y < radius * radius:
                dst.append((y, x))
    return dst


def authors_path_groups(radius):
    """Each direction's path (destination first), grouped by path length, ascending."""
    groups = {}
    for dy, dx in authors_directions(radius):
        coords = [(y, x) for y in range(min(0, dy), max(0, dy) + 1)
                  for x in range(min(0, dx), max(0, dx) + 1)
                  if (dy * x - dx * y) ** 2 / (dy * dy + dx * dx) < 1]
        coords.sort(key=lambda c: -(abs(c[0]) + abs(c[1])))
        groups.setdefault(len(coords), []).append(coords)
    return [groups[n] for n in sorted(groups)]


def authors_path_indices(radius, h, w):
    rf = int(np.ceil(radius)) - 1
    full = torch.arange(h * w).reshape(h, w)
    ch, cw = h - rf, w - 2 * rf
    src = full[:ch, rf:rf + cw].reshape(-1)
    groups = [torch.stack([torch.stack([full[dy:dy + ch, rf + dx:rf + dx + cw].reshape(-1)
                                        for dy, dx in coords]) for coords in paths])
              for paths in authors_path_groups(radius)]
    dst = torch.cat([g[:, 0] for g in groups])
    return src, groups, dst


def authors_edge_to_affinity(edge, groups):
    flat = edge.reshape(-1)
    return torch.cat([1 - flat[g].max(dim=1).values for g in groups])     # (dirs, sources)


def authors_propagate(cams, edge, radius=5, beta=10, exp_times=8):
    k, h, w = cams.shape
    big_h, big_w = h + radius, w + 2 * radius
    edge_pad = F.pad(edge[None, None], (radius, radius, 0, radius), value=1.0)[0, 0]
    src, groups, dst = authors_path_indices(radius, big_h, big_w)
    aff = authors_edge_to_affinity(edge_pad, groups)
    n = big_h * big_w
    a = torch.zeros(n, n, dtype=edge.dtype)
    s = src[None].expand_as(dst)
    a[s.reshape(-1), dst.reshape(-1)] = aff.reshape(-1)
    a[dst.reshape(-1), s.reshape(-1)] = aff.reshape(-1)
    a[torch.arange(n), torch.arange(n)] = 1.0
    a = a.reshape(big_h, big_w, big_h, big_w)[:-radius, radius:-radius, :-radius, radius:-radius]
    a = a.reshape(h * w, h * w) ** beta
    t = a / a.sum(dim=0, keepdim=True)
    for _ in range(exp_times):
        t = t @ t
    x = cams * (1 - edge)
    return (x.reshape(k, -1) @ t).reshape(k, h, w)


def authors_pair_labels(label, src, dst, num_valid=21):
    flat = label.reshape(-1)
    a, b = flat[src][None], flat[dst]
    valid = (a < num_valid) & (b < num_valid)
    eq = a == b
    return (eq & valid & (a == 0)).double(), (eq & valid & (a > 0)).double(), (~eq & valid).double()


def authors_loss(aff, bg_pos, fg_pos, neg):
    pos_l, neg_l = -torch.log(aff + 1e-5), -torch.log(1 + 1e-5 - aff)
    bg = (bg_pos * pos_l).sum() / (bg_pos.sum() + 1e-5)
    fg = (fg_pos * pos_l).sum() / (fg_pos.sum() + 1e-5)
    ng = (neg * neg_l).sum() / (neg.sum() + 1e-5)
    return (bg / 2 + fg / 2 + ng) / 2          # the displacement terms give the edges no gradient


def authors_crf_label(img, labels, n_labels, t=10, gt_prob=0.7):
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels
    h, w = img.shape[:2]
    d = dcrf.DenseCRF2D(w, h, n_labels)
    d.setUnaryEnergy(unary_from_labels(labels, n_labels, gt_prob=gt_prob, zero_unsure=False))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=50, srgb=5, rgbim=np.ascontiguousarray(np.copy(img)), compat=10)
    q = d.inference(t)
    return np.argmax(np.array(q).reshape((n_labels, h, w)), axis=0)


def authors_ir_label(img, cams, keys, fg=0.30, bg=0.05, crf=True):
    keys = np.pad(np.asarray(keys) + 1, (1, 0), mode="constant")

    def conf(thres):
        pred = np.argmax(np.pad(cams, ((1, 0), (0, 0), (0, 0)), mode="constant",
                                constant_values=thres), axis=0)
        if crf:
            pred = authors_crf_label(img, pred, n_labels=keys.shape[0])
        return keys[pred]

    fg_conf, bg_conf = conf(fg), conf(bg)
    out = fg_conf.copy()
    out[fg_conf == 0] = 255
    out[bg_conf + fg_conf == 0] = 0
    return out


# ----------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("radius,count", [(5, 34), (10, 152)])
def test_the_directions_are_the_authors_half_plane(radius, count):
    assert sorted(neighbor_offsets(radius)) == sorted(authors_directions(radius))
    assert len(neighbor_offsets(radius)) == count


@pytest.mark.parametrize("radius,h,w", [(5, 13, 15), (10, 24, 26)])
def test_boundary_affinity_equals_the_authors_on_their_sources(radius, h, w):
    g = torch.Generator().manual_seed(radius)
    edge = torch.rand(h, w, generator=g, dtype=torch.float64)
    src, groups, dst = authors_path_indices(radius, h, w)
    theirs = authors_edge_to_affinity(edge, groups)          # (dirs, sources)
    ours = boundary_affinity(edge[None], radius)[0]          # (K, H, W)
    index = {d: k for k, d in enumerate(neighbor_offsets(radius))}
    sy, sx = src // w, src % w
    for row, (d_idx) in enumerate(dst):
        dy, dx = int(d_idx[0] // w - sy[0]), int(d_idx[0] % w - sx[0])
        assert torch.equal(ours[index[(dy, dx)], sy, sx], theirs[row]), (dy, dx)


@pytest.mark.parametrize("radius", [5, 10])
def test_pair_labels_and_loss_equal_the_authors(radius):
    h = w = 2 * radius + 8
    g = torch.Generator().manual_seed(3)
    edge = torch.rand(h, w, generator=g, dtype=torch.float64)
    label = torch.randint(0, 3, (h, w), generator=g)
    label[torch.rand(h, w, generator=g) < 0.2] = 255
    src, groups, dst = authors_path_indices(radius, h, w)
    theirs = authors_loss(authors_edge_to_affinity(edge, groups),
                          *authors_pair_labels(label, src, dst))
    masks = pair_label_masks(label[None], radius, border="authors")
    assert int(masks["neg"].sum()) == int(authors_pair_labels(label, src, dst)[2].sum())
    ours = relation_loss(boundary_affinity(edge[None], radius), masks)
    assert torch.allclose(ours, theirs, rtol=1e-4), (float(ours), float(theirs))
    # and every in-image pair with border=all: more pairs, a loss that trains (finite gradients)
    edge.requires_grad_(True)
    loss = relation_loss(boundary_affinity(edge[None], radius), pair_label_masks(label[None], radius))
    loss.backward()
    assert torch.isfinite(edge.grad).all() and edge.grad.abs().sum() > 0


def test_the_walk_equals_the_authors_dense_propagation():
    g = torch.Generator().manual_seed(7)
    h, w, k = 9, 11, 2
    cams = torch.rand(k, h, w, generator=g, dtype=torch.float64)
    edge = torch.rand(h, w, generator=g, dtype=torch.float64) ** 3     # mostly low, some walls
    theirs = authors_propagate(cams, edge, radius=5, beta=10, exp_times=8)
    ours = boundary_walk(cams[None], edge[None], beta=10, t=256, radius=5)[0]
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-9 * float(theirs.abs().max()))
    # the benchmark's baseline (the package's own dense method) is theirs too
    assert torch.allclose(boundary_walk_dense_authors(cams, edge, 10, 256, 5), theirs, rtol=1e-9)
    fast = boundary_walk(cams[None], edge[None], beta=10, t=256, radius=5, tol=1e-5)[0]
    assert (fast - theirs).abs().max() <= 2e-5 * float((cams * (1 - edge)).abs().max())


def test_labels_from_walked_maps_are_the_authors():
    g = torch.Generator().manual_seed(1)
    walked = torch.rand(3, 20, 24, generator=g) * 2.5
    keys = [4, 9, 15]
    up = walked / walked.max()
    theirs = np.asarray([0, *keys])[np.argmax(np.pad(up.numpy(), ((1, 0), (0, 0), (0, 0)),
                                                     constant_values=0.25), axis=0)]
    assert np.array_equal(walk_to_label(walked, keys).numpy(), theirs)


def test_relation_labels_from_cams_are_the_authors_without_and_with_the_crf():
    rng = np.random.default_rng(0)
    h, w = 40, 52
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[:, 26:] //= 3                           # two regions the bilateral kernel tells apart
    cams = np.zeros((2, h, w), np.float32)
    cams[0, 5:30, 4:24] = rng.uniform(0.2, 1.0, (25, 20))
    cams[1, 10:35, 30:50] = rng.uniform(0.02, 0.6, (25, 20))
    keys = [2, 5]                                  # 0-based class indices, as the authors keep
    class_ids = [k + 1 for k in keys]
    plain = confident_labels(torch.from_numpy(cams), class_ids)
    assert np.array_equal(plain.numpy(), authors_ir_label(img, cams, keys, crf=False))
    assert set(np.unique(plain.numpy())) == {0, 3, 6, 255}
    refined = confident_labels(torch.from_numpy(cams), class_ids,
                               refine=lambda lab, n: crf_labels(img, lab, n))
    assert np.array_equal(refined.numpy(), authors_ir_label(img, cams, keys, crf=True))


def test_labels_reduce_to_stride_4_as_pils_nearest_resize():
    rng = np.random.default_rng(2)
    label = rng.integers(0, 21, (64, 96), dtype=np.uint8)
    theirs = np.asarray(Image.fromarray(label).resize((96 // 4, 64 // 4), Image.NEAREST))
    assert np.array_equal(reduce_labels(torch.from_numpy(label)).numpy(), theirs)
