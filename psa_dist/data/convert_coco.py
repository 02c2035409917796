"""MS-COCO 2014 -> psa-dist shards with semantic masks (``psa-dist data convert-coco``).

Layout read::

    coco_root/<split>/<file_name>                    e.g. train2014/COCO_train2014_000000000009.jpg
    coco_root/annotations/instances_<split>.json     the instance annotations of that split

Needs pycocotools (``pip install 'psa-dist[coco]'``), imported only when a conversion runs.

Classes: the JSON's categories sorted by category id map to 1..K (COCO's 80 ids 1..90 with gaps
become 1..80); every split must have the same categories. Per image:

* ``cls.json``: the classes of its non-crowd annotations. An image without any is skipped
  (``SkipSample``, counted in ``info["skipped"]``), without reading the image file.
* ``mask.png``: background 0; each non-crowd instance painted with its class, **largest first**
  (by the annotation's ``area``, ties in file order) so that small objects lying on large ones stay
  visible; then every crowd region set to 255 (ignore), on top of everything.
* ``jpg``: the original bytes, verified to decode fully and to have the JSON's width and height.
* ``meta.json``: ``{"source": "coco:<file stem>", "size": [H, W]}``; key = the file name stem.

The JSON is loaded once in the parent, which builds one small picklable :class:`CocoItem` per image
(path, size, that image's annotations); workers only decode images and rasterise masks.
The palette is the VOC colour map extended to K + 1 entries.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from .convert_voc import read_image_file, voc_palette
from .dataset_writer import SkipSample, build_dataset
from .shards import encode_json, encode_mask

IGNORE = 255
MISSING_PYCOCOTOOLS = ("converting COCO needs pycocotools, which is not installed: "
                       "pip install 'psa-dist[coco]'")


def _import_pycocotools():
    try:
        import pycocotools.mask as mask_utils
        from pycocotools.coco import COCO
    except ImportError as e:
        raise ImportError(MISSING_PYCOCOTOOLS) from e
    return COCO, mask_utils


class CocoItem(NamedTuple):
    """Everything a worker needs for one image: no JSON, no COCO object."""
    file_name: str
    path: str
    height: int
    width: int
    anns: tuple  # of dicts: id, category_id, iscrowd, area, segmentation

    def __repr__(self) -> str:
        return self.file_name


def annotation_mask(ann: dict, height: int, width: int, mask_utils) -> np.ndarray:
    """HxW uint8 0/1 mask of one annotation (polygons, uncompressed or compressed RLE).

    The same cases as ``COCO.annToMask``, without needing a COCO object.
    """
    seg = ann["segmentation"]
    if isinstance(seg, list):                              # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):   # uncompressed RLE
        rle = mask_utils.frPyObjects(seg, height, width)
    elif isinstance(seg, dict):                            # compressed RLE
        rle = seg
    else:
        raise ValueError(f"segmentation of type {type(seg).__name__}")
    if isinstance(seg, dict) and list(seg.get("size", ())) != [height, width]:
        raise ValueError(f"RLE size {seg.get('size')} differs from the image's [{height}, {width}]")
    return mask_utils.decode(rle)


class _CocoSample:
    """Picklable CocoItem -> encoded sample; holds only the category id -> class id map."""

    def __init__(self, label_of_category: dict[int, int]):
        self.label_of_category = label_of_category

    def label(self, item: CocoItem, ann: dict) -> int:
        try:
            return self.label_of_category[ann["category_id"]]
        except KeyError:
            raise ValueError(f"{item.file_name}: annotation {ann.get('id')} has unknown category_id "
                             f"{ann['category_id']}") from None

    def __call__(self, item: CocoItem) -> dict:
        _, mask_utils = _import_pycocotools()
        things = [a for a in item.anns if not a["iscrowd"]]
        crowds = [a for a in item.anns if a["iscrowd"]]
        classes = sorted({self.label(item, a) for a in things})
        if not classes:
            raise SkipSample(f"no labels: {item.file_name} has no non-crowd annotation")
        data, field, size = read_image_file(item.path)
        if size != (item.height, item.width):
            raise ValueError(f"image file {item.path} is {size[1]}x{size[0]} but the annotations "
                             f"say {item.width}x{item.height}")
        semantic = np.zeros(size, np.uint8)
        # Largest first: a small object on a large one is painted last and stays visible.
        for ann in sorted(things, key=lambda a: -float(a["area"] or 0.0)):
            semantic[self._mask(item, ann, mask_utils) > 0] = self.label(item, ann)
        for ann in crowds:
            semantic[self._mask(item, ann, mask_utils) > 0] = IGNORE
        stem = Path(item.file_name).stem
        return {"__key__": stem, field: data, "cls.json": encode_json(classes),
                "mask.png": encode_mask(semantic),
                "meta.json": encode_json({"source": f"coco:{stem}", "size": list(size)})}

    @staticmethod
    def _mask(item: CocoItem, ann: dict, mask_utils) -> np.ndarray:
        try:
            return annotation_mask(ann, item.height, item.width, mask_utils)
        except Exception as e:  # noqa: BLE001 - re-raised naming the image and annotation
            raise ValueError(f"{item.file_name}: annotation {ann.get('id')} has a bad segmentation: "
                             f"{type(e).__name__}: {e}") from e


def _keep(ann: dict) -> dict:
    return {k: ann.get(k) for k in ("id", "category_id", "iscrowd", "area", "segmentation")}


def load_split(coco_root: Path, split: str, COCO) -> tuple[list[dict], list[CocoItem]]:
    """(categories sorted by id, one CocoItem per image sorted by image id) of one split."""
    ann_file = coco_root / "annotations" / f"instances_{split}.json"
    image_dir = coco_root / split
    if not ann_file.is_file():
        raise FileNotFoundError(f"missing annotation file {ann_file}")
    if not image_dir.is_dir():
        raise FileNotFoundError(f"missing image directory {image_dir}")
    coco = COCO(str(ann_file))
    categories = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
    items = []
    for image_id in sorted(coco.imgs):
        img = coco.imgs[image_id]
        anns = tuple(_keep(a) for a in coco.imgToAnns.get(image_id, []))
        items.append(CocoItem(img["file_name"], str(image_dir / img["file_name"]),
                              int(img["height"]), int(img["width"]), anns))
    return categories, items


def convert_coco(coco_root, out, splits: Sequence[str] = ("train2014", "val2014"),
                 shard_size: int = 1000, workers: int = 4, strict: bool = False,
                 progress: bool = True) -> dict:
    """Convert the COCO splits to shards under ``out``; returns build_dataset's info dict."""
    COCO, _ = _import_pycocotools()
    root = Path(coco_root)
    categories, items = None, {}
    for split in splits:
        cats, items[split] = load_split(root, split, COCO)
        if categories is not None and [(c["id"], c["name"]) for c in cats] != \
                [(c["id"], c["name"]) for c in categories]:
            raise ValueError(f"split {split!r} has other categories than {splits[0]!r}: the dataset "
                             f"needs one class list")
        categories = cats
    categories = categories or []
    label_of_category = {int(c["id"]): i + 1 for i, c in enumerate(categories)}
    source = {"kind": "coco", "coco_root": str(root.resolve()), "splits": list(splits),
              "category_ids": [int(c["id"]) for c in categories]}
    return build_dataset(out, items, _CocoSample(label_of_category),
                         classes=[c["name"] for c in categories],
                         palette=voc_palette(len(categories) + 1), source=source,
                         shard_size=shard_size, workers=workers, strict=strict, progress=progress)
