"""The benchmarks' default cases that the command line's parser offers (importable without torch,
so that ``psa-dist --help`` answers at once): the random walk's feature-grid sizes and the shard
size COCO is converted with."""
from __future__ import annotations

# (name, feature grid h × w): a 500×375 VOC image and a 640×480 COCO image at stride 8, and the
# COCO image at stride 4 (dense would need three 19,200² float32 matrices: 4.4 GB, and ~10^14 flops).
SIZES = {"voc-s8": (47, 63), "coco-s8": (60, 80), "coco-s4": (120, 160)}
COCO_SHARD_SIZE = 100           # docs/coco.md: --shard-size 100 (828 train shards)
