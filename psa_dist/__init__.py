"""psa-dist: weakly supervised semantic segmentation with AffinityNet (Ahn & Kwak, CVPR 2018).

The algorithm is a set of pure tensor functions, re-exported here; the stages, Ray workers and
trainers all call these and never reimplement them.
"""
from .core.affinity import affinity_labels, affinity_loss, background_score, neighbor_offsets
from .core.cam import cam_multiscale, cam_multiscale_batch, cam_to_label, rw_inputs, rw_to_label
from .core.crf import crf_refine
from .core.metrics import ConfusionMatrix, confusion_matrix, iou_from_confusion, miou_from_confusion
from .core.random_walk import random_walk, random_walk_dense, transition_weights

__version__ = "0.1.0"

__all__ = [
    "neighbor_offsets", "affinity_labels", "affinity_loss", "background_score", "random_walk",
    "random_walk_dense", "transition_weights", "crf_refine", "cam_multiscale",
    "cam_multiscale_batch", "cam_to_label", "rw_inputs", "rw_to_label", "ConfusionMatrix",
    "confusion_matrix", "iou_from_confusion", "miou_from_confusion",
]
