"""psa-dist: weakly supervised semantic segmentation with AffinityNet (Ahn & Kwak, CVPR 2018).

The algorithm is a set of pure tensor functions, re-exported here; the stages, Ray workers and
trainers all call these and never reimplement them. They are imported on first use
(``psa_dist.random_walk``), so that importing the package (the command line's ``--help``) does not
import torch.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "core.affinity": ["affinity_labels", "affinity_loss", "background_score", "neighbor_offsets"],
    "core.cam": ["cam_multiscale", "cam_multiscale_batch", "cam_to_label", "rw_inputs",
                 "rw_to_label"],
    "core.crf": ["crf_refine"],
    "core.metrics": ["ConfusionMatrix", "confusion_matrix", "iou_from_confusion",
                     "miou_from_confusion"],
    "core.random_walk": ["random_walk", "random_walk_dense", "transition_weights"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'psa_dist' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
