"""Datasets as WebDataset shards: the shard format, the training loaders, the dataset writer, the
synthetic generator, the VOC and COCO converters, and inspection.

Layer 2: imports ``core``, ``util`` and ``config``; not ``nets`` or ``cluster`` (siblings).
"""
