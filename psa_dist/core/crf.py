"""Dense CRF refinement of score maps, as the authors apply it before taking confident regions.

Needs the optional extra ``pydensecrf2`` (``pip install 'psa-dist[crf]'``); without it
:func:`crf_refine` raises a clear error naming the install command.
"""
from __future__ import annotations

import numpy as np
import torch


class CrfUnavailable(ImportError):
    pass


def _densecrf():
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as e:
        raise CrfUnavailable("the dense CRF needs pydensecrf2: pip install 'psa-dist[crf]' "
                             "(or turn off the stage's crf setting: aff_labels.crf, random_walk.crf, "
                             "ir_labels.crf, irn_walk.crf)") from e
    return dcrf, unary_from_softmax


def crf_available() -> bool:
    try:
        _densecrf()
        return True
    except CrfUnavailable:
        return False


def crf_refine(image, probs, iters: int = 10, gauss_sxy: float = 3.0, gauss_compat: float = 3.0,
               bi_sxy: float = 80.0, bi_srgb: float = 13.0, bi_compat: float = 10.0):
    """Mean-field dense CRF (Krähenbühl & Koltun) over ``probs`` (K, H, W) given ``image`` (H, W, 3).

    The unary is ``-log(probs)`` (pydensecrf's ``unary_from_softmax``), the authors' settings are the
    defaults: 10 iterations, Gaussian kernel sxy 3 / compat 3, bilateral sxy 80 / srgb 13 / compat 10.
    Accepts numpy or torch; returns the same kind, (K, H, W) marginals.
    """
    dcrf, unary_from_softmax = _densecrf()
    is_torch = isinstance(probs, torch.Tensor)
    p = probs.detach().cpu().double().numpy() if is_torch else np.asarray(probs, np.float64)
    img = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    k, h, w = p.shape
    if img.shape[:2] != (h, w):
        raise ValueError(f"image {img.shape[:2]} and probs {(h, w)} must have the same size")
    d = dcrf.DenseCRF2D(w, h, k)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(p.astype(np.float32))))
    d.addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat)
    d.addPairwiseBilateral(sxy=bi_sxy, srgb=bi_srgb, rgbim=np.ascontiguousarray(img.astype(np.uint8)),
                           compat=bi_compat)
    q = np.asarray(d.inference(iters), np.float32).reshape(k, h, w)
    return torch.from_numpy(q).to(probs.device) if is_torch else q


def crf_labels(image, labels, n_labels: int, iters: int = 10, gt_prob: float = 0.7,
               gauss_sxy: float = 3.0, gauss_compat: float = 3.0, bi_sxy: float = 50.0,
               bi_srgb: float = 5.0, bi_compat: float = 10.0):
    """The dense CRF on a hard label map (H, W) in 0..n_labels-1 (IRN's ``crf_inference_label``):
    each pixel's unary trusts its label with probability ``gt_prob`` (pydensecrf's
    ``unary_from_labels``, label 0 a label like the others), the authors' kernels as defaults;
    returns the argmax of the marginals after ``iters`` iterations, the same kind as ``labels``."""
    dcrf, _ = _densecrf()
    from pydensecrf.utils import unary_from_labels
    is_torch = isinstance(labels, torch.Tensor)
    lab = labels.detach().cpu().numpy() if is_torch else np.asarray(labels)
    img = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    h, w = lab.shape
    if img.shape[:2] != (h, w):
        raise ValueError(f"image {img.shape[:2]} and labels {(h, w)} must have the same size")
    d = dcrf.DenseCRF2D(w, h, n_labels)
    d.setUnaryEnergy(np.ascontiguousarray(
        unary_from_labels(lab.astype(np.int64), n_labels, gt_prob=gt_prob, zero_unsure=False)))
    d.addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat)
    d.addPairwiseBilateral(sxy=bi_sxy, srgb=bi_srgb, rgbim=np.ascontiguousarray(img.astype(np.uint8)),
                           compat=bi_compat)
    out = np.argmax(np.asarray(d.inference(iters)).reshape(n_labels, h, w), axis=0)
    return torch.from_numpy(out).to(labels.device) if is_torch else out
