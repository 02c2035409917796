"""The benchmarks' cases as data (importable without torch, so that ``psa-dist --help`` answers at
once): the random walk's feature-grid sizes, the shard size COCO is converted with, and the
datasets, stages and bounds ``bench cost`` measures."""
from __future__ import annotations

# (name, feature grid h × w): a 500×375 VOC image and a 640×480 COCO image at stride 8, and the
# COCO image at stride 4 (dense would need three 19,200² float32 matrices: 4.4 GB, and ~10^14 flops).
SIZES = {"voc-s8": (47, 63), "coco-s8": (60, 80), "coco-s4": (120, 160)}
# IRN's walk at stride 4 (bench random-walk --method irn): VOC's 500x375 and COCO's 640x480 image
IRN_SIZES = {"voc-s4": (94, 125), "coco-s4": (120, 160)}
COCO_SHARD_SIZE = 100           # docs/coco.md: --shard-size 100 (828 train shards)

# size (H, W), classes, the classes of the image (2 for VOC: train_aug has 1.5 per image; 3 for
# COCO: 2.9), images of the training split labelled
DATASETS = {
    "voc": {"config": "voc_resnet38.yaml", "size": (375, 500), "classes": 20, "present": [12, 15],
            "images": 10582, "split": "VOC 2012 train_aug"},
    "coco": {"config": "coco_resnet50.yaml", "size": (480, 640), "classes": 80,
             "present": [1, 3, 10], "images": 82783, "split": "COCO 2014 train"},
}
AMP_STAGES = ("train_cls", "cams", "train_aff", "train_seg")     # stages with a *.amp setting
# name -> (dataset, stage it is a case of, extra overrides, what it bounds)
BOUNDS = {
    "walk_stride4": ("coco", "random_walk", ["model.aff_stride=4"],
                     "AffinityNet at stride 4 + the walk on the COCO image (the walk's memory)"),
    "resnet38_scale2": ("voc", "cams", ["cams.scales=[2.0]"],
                        "ResNet-38 CAMs at scale 2.0 + flip of the VOC image (the largest input)"),
}
# bench quality's variants of the synthetic data: name -> overrides of the config (besides where
# its data and outputs go)
VARIANTS = {
    "demo": [],
    "seed1": ["synth.seed=1"],
    "8-classes-dense-clutter": ["synth.seed=3", "synth.num_classes=8", "synth.clutter_density=1.6"],
    "faint-body": ["synth.seed=4", "synth.body_pattern=0.3"],
    "small-objects": ["synth.seed=5", "synth.object_width=[0.16,0.24]", "synth.max_objects=3"],
    "4-classes-noisy": ["synth.seed=6", "synth.num_classes=4", "synth.clutter_noise=20"],
}
