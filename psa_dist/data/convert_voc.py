"""PASCAL VOC 2012 (+ SBD's SegmentationClassAug) -> psa-dist shards (``psa-dist data convert-voc``).

Layout read (``voc_root`` is the ``VOCdevkit/VOC2012`` directory; passing ``VOCdevkit`` works too)::

    voc_root/JPEGImages/<id>.jpg                 the images, passed through byte for byte
    voc_root/SegmentationClass/<id>.png          palette ("P") masks: index = class id, 255 = boundary
    voc_root/Annotations/<id>.xml                <object><name>aeroplane</name>...</object>
    voc_root/ImageSets/Segmentation/<split>.txt  train, val, trainval (and optionally train_aug)
    sbd_root/SegmentationClassAug/<id>.png       (optional) SBD masks, index PNGs in mode "L" or "P"
    sbd_root/train_aug.txt                       (optional) the 10,582-image train_aug list

A split is the name of a list. ``train_aug`` is read from ``ImageSets/Segmentation/train_aug.txt``
if present, else from ``sbd_root/train_aug.txt``. A list line is an image id (``2007_000032``) or a
DeepLab-style line (``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png``): the
first token's file stem is the id.

Per image the sample has ``jpg`` (the original bytes, verified to decode fully), ``cls.json``,
``meta.json`` (``{"source": "voc:<id>", "size": [H, W]}``) and, where a mask exists, ``mask.png``
(re-encoded as mode "L", class ids and 255 unchanged). The key is the image id.

* ``train_aug``: mask = SegmentationClassAug if present, else SegmentationClass, else none (the
  image keeps only its image-level labels, read from the XML).
* any other split: SegmentationClass is required.
* ``cls.json`` = the mask's classes (values other than 0 and 255) where there is a mask, else the
  XML object names mapped to 1..20 in the standard order.

Bad input (missing listed image / XML / required mask, an image that does not decode fully, a mask of
another size or with values outside 0..20/255, an unknown class name) raises from the per-image
function with the file and reason, so ``build_dataset`` reports and counts it (or stops, strict).

:func:`read_image_file` is shared with :mod:`psa_dist.convert_coco`.
"""
from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image

from .dataset_writer import build_dataset
from .shards import encode_json, encode_mask

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]
CLASS_ID = {name: i + 1 for i, name in enumerate(VOC_CLASSES)}
IGNORE = 255


def voc_palette(n: int = 21) -> list[list[int]]:
    """The standard VOC colour map (bit-shifting construction): 0 black, 1 [128, 0, 0], ..."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append([r, g, b])
    return out


def read_image_file(path: str | Path) -> tuple[bytes, str, tuple[int, int]]:
    """Read an image file: (its bytes unchanged, field "jpg"/"png", (H, W)) after a full decode.

    A missing file, a truncated or corrupt image, or a format other than JPEG/PNG raises ValueError
    or FileNotFoundError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing image file {path}")
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()           # decodes every pixel: a truncated file raises here
            fmt, (w, h) = im.format, im.size
    except Exception as e:  # noqa: BLE001 - re-raised naming the file
        raise ValueError(f"image file {path} does not decode: {type(e).__name__}: {e}") from e
    if fmt not in ("JPEG", "PNG"):
        raise ValueError(f"image file {path} is {fmt}, expected JPEG or PNG")
    return data, ("jpg" if fmt == "JPEG" else "png"), (h, w)


def read_index_mask(path: Path, size: tuple[int, int], image_path: Path) -> np.ndarray:
    """An index PNG (mode "P" read without conversion, or "L") as HxW uint8, checked against ``size``."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            mask = np.asarray(im)
    except Exception as e:  # noqa: BLE001 - re-raised naming the file
        raise ValueError(f"mask file {path} does not decode: {type(e).__name__}: {e}") from e
    if mode not in ("P", "L"):
        raise ValueError(f"mask file {path} has mode {mode!r}; expected an index PNG (mode P or L)")
    if mask.shape != size:
        raise ValueError(f"mask file {path} is {mask.shape[1]}x{mask.shape[0]} but image "
                         f"{image_path} is {size[1]}x{size[0]}")
    bad = sorted(int(v) for v in np.unique(mask) if v > len(VOC_CLASSES) and v != IGNORE)
    if bad:
        raise ValueError(f"mask file {path} has values {bad} outside 0..20 and 255")
    return mask


def xml_class_ids(path: Path) -> list[int]:
    """Sorted class ids of the ``<object><name>`` entries of a VOC annotation file."""
    if not path.is_file():
        raise FileNotFoundError(f"missing annotation file {path}")
    try:
        names = [(obj.findtext("name") or "").strip() for obj in ET.parse(path).getroot().iter("object")]
    except ET.ParseError as e:
        raise ValueError(f"annotation file {path} is not valid XML: {e}") from e
    for name in names:
        if name not in CLASS_ID:
            raise ValueError(f"annotation file {path}: unknown class name {name!r}")
    return sorted({CLASS_ID[n] for n in names})


class VocItem(NamedTuple):
    """One listed image: which split's list named it and its id."""
    split: str
    image_id: str

    def __repr__(self) -> str:
        return f"{self.image_id} ({self.split} list)"


class _VocSample:
    """Picklable VocItem -> encoded sample; holds only the two root paths."""

    def __init__(self, voc_root: Path, sbd_root: Path | None):
        self.voc_root, self.sbd_root = voc_root, sbd_root

    def mask_candidates(self, item: VocItem) -> tuple[list[Path], bool]:
        """Mask files to try in order, and whether one is required."""
        seg_class = self.voc_root / "SegmentationClass" / f"{item.image_id}.png"
        if item.split != "train_aug":
            return [seg_class], True
        aug = [self.sbd_root / "SegmentationClassAug" / f"{item.image_id}.png"] if self.sbd_root else []
        return aug + [seg_class], False

    def __call__(self, item: VocItem) -> dict:
        image_path = self.voc_root / "JPEGImages" / f"{item.image_id}.jpg"
        data, field, size = read_image_file(image_path)
        candidates, required = self.mask_candidates(item)
        mask_path = next((p for p in candidates if p.is_file()), None)
        sample = {"__key__": item.image_id, field: data}
        if mask_path is not None:
            mask = read_index_mask(mask_path, size, image_path)
            classes = sorted(int(v) for v in np.unique(mask) if v not in (0, IGNORE))
            sample["mask.png"] = encode_mask(mask)
        elif required:
            raise FileNotFoundError(f"missing mask file {candidates[0]}")
        else:
            classes = xml_class_ids(self.voc_root / "Annotations" / f"{item.image_id}.xml")
        sample["cls.json"] = encode_json(classes)
        sample["meta.json"] = encode_json({"source": f"voc:{item.image_id}", "size": list(size)})
        return sample


def find_split_list(voc_root: Path, split: str, sbd_root: Path | None) -> Path:
    """The list file of ``split``; a missing one raises FileNotFoundError naming every path tried."""
    tried = [voc_root / "ImageSets" / "Segmentation" / f"{split}.txt"]
    if split == "train_aug" and sbd_root is not None:
        tried.append(sbd_root / "train_aug.txt")
    for path in tried:
        if path.is_file():
            return path
    hint = " (pass --sbd-root for SBD's train_aug.txt)" if split == "train_aug" and not sbd_root else ""
    raise FileNotFoundError(f"no list for split {split!r}: looked at "
                            f"{', '.join(str(p) for p in tried)}{hint}")


def read_id_list(path: Path) -> list[str]:
    """Image ids of a list file, in file order; a repeated id raises (it would repeat a key)."""
    ids, seen = [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        tokens = line.split()
        if not tokens or tokens[0].startswith("#"):
            continue
        image_id = Path(tokens[0]).stem
        if image_id in seen:
            raise ValueError(f"{path}:{n}: image id {image_id!r} listed twice")
        seen.add(image_id)
        ids.append(image_id)
    return ids


def resolve_voc_root(voc_root: str | Path) -> Path:
    root = Path(voc_root)
    if not (root / "JPEGImages").is_dir() and (root / "VOC2012" / "JPEGImages").is_dir():
        root = root / "VOC2012"
    if not (root / "JPEGImages").is_dir():
        raise FileNotFoundError(f"{voc_root} has no JPEGImages/: pass the VOCdevkit/VOC2012 directory")
    return root


def convert_voc(voc_root, out, splits: Sequence[str] = ("train_aug", "val"), sbd_root=None,
                shard_size: int = 1000, workers: int = 4, strict: bool = False,
                progress: bool = True) -> dict:
    """Convert the listed VOC splits to shards under ``out``; returns build_dataset's info dict."""
    root = resolve_voc_root(voc_root)
    sbd = Path(sbd_root) if sbd_root else None
    if sbd is not None and not sbd.is_dir():
        raise FileNotFoundError(f"SBD root {sbd} is not a directory")
    lists = {split: find_split_list(root, split, sbd) for split in splits}
    items = {split: [VocItem(split, i) for i in read_id_list(path)] for split, path in lists.items()}
    source = {"kind": "voc", "voc_root": str(root.resolve()),
              "sbd_root": str(sbd.resolve()) if sbd else None, "splits": list(splits),
              "lists": {split: str(path.resolve()) for split, path in lists.items()}}
    return build_dataset(out, items, _VocSample(root, sbd), classes=list(VOC_CLASSES),
                         palette=voc_palette(len(VOC_CLASSES) + 1), source=source,
                         shard_size=shard_size, workers=workers, strict=strict, progress=progress)
