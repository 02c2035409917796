"""`psa-dist data inspect` and `data preview`: look at a dataset directory without writing code."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .shards import (
    SampleError,
    decode_sample,
    iter_shard,
    read_dataset_json,
    shard_basename,
    split_shards,
)


def inspect_dataset(root: str | Path, verify: bool = True, shard_url: str | None = None) -> dict:
    """Counts per split and a class histogram (images containing each class, and pixel share).

    With ``verify`` every shard is read and every sample decoded, so a bad shard or sample is found
    here rather than hours into a job; problems are listed, not raised. ``shard_url`` reads the
    shards through that template (``data.shard_url``, e.g. ``pipe:aws s3 cp s3://b/voc/{name} -``)
    while ``dataset.json`` comes from ``root``: the check a job's reads will pass.
    """
    info = read_dataset_json(root)
    classes = info["classes"]
    report = {"root": str(root), "classes": classes, "splits": {}, "problems": []}
    for split in info["splits"]:
        images = np.zeros(len(classes) + 1, np.int64)
        pixels = np.zeros(256, np.int64)
        n = 0
        declared = {s["name"]: s["count"] for s in info["splits"][split]["shards"]}
        for shard in split_shards(root, split, info, shard_url):
            seen = 0
            try:
                for raw in iter_shard(shard):
                    seen += 1
                    if not verify:
                        continue
                    try:
                        s = decode_sample(raw)
                    except SampleError as e:
                        report["problems"].append(str(e))
                        continue
                    for c in s["cls"]:
                        images[c] += 1
                    if "mask" in s:
                        pixels += np.bincount(s["mask"].ravel(), minlength=256)
            except Exception as e:  # noqa: BLE001 - reported, the rest is still inspected
                report["problems"].append(str(e))
            if seen != declared[shard_basename(shard)]:
                report["problems"].append(f"{shard}: {seen} samples, dataset.json says "
                                          f"{declared[shard_basename(shard)]}")
            n += seen
        total_px = max(int(pixels[: len(classes) + 1].sum()), 1)
        report["splits"][split] = {
            "samples": n, "shards": len(declared),
            "images_per_class": {name: int(images[i + 1]) for i, name in enumerate(classes)},
            "pixel_share": {name: round(float(pixels[i]) / total_px, 4)
                            for i, name in enumerate(["background"] + classes)},
            "ignore_pixels": int(pixels[255]),
        }
    return report


def format_report(report: dict) -> str:
    lines = [f"dataset {report['root']}: {len(report['classes'])} classes"]
    for split, r in report["splits"].items():
        lines.append(f"  {split}: {r['samples']} samples in {r['shards']} shards")
    lines.append("")
    splits = list(report["splits"])
    width = max(len(c) for c in ["background"] + report["classes"]) + 2
    lines.append("class".ljust(width) + "".join(f"{s + ' imgs':>12}{s + ' px%':>11}" for s in splits))
    for i, name in enumerate(["background"] + report["classes"]):
        row = name.ljust(width)
        for s in splits:
            r = report["splits"][s]
            imgs = "-" if i == 0 else str(r["images_per_class"][name])
            row += f"{imgs:>12}{100 * r['pixel_share'][name]:>10.1f}%"
        lines.append(row)
    if report["problems"]:
        lines.append(f"\n{len(report['problems'])} problems:")
        lines += [f"  {p}" for p in report["problems"][:50]]
    return "\n".join(lines)


def colorize(mask: np.ndarray, palette: list[list[int]]) -> np.ndarray:
    pal = np.zeros((256, 3), np.uint8)
    pal[: len(palette)] = np.asarray(palette, np.uint8)
    pal[255] = (224, 224, 192)      # ignore / neutral, as VOC draws it
    return pal[mask]


def overlay(image: np.ndarray, mask: np.ndarray, palette, alpha: float = 0.5) -> np.ndarray:
    col = colorize(mask, palette).astype(np.float32)
    show = (mask > 0)[..., None]
    out = np.where(show, (1 - alpha) * image + alpha * col, image)
    return out.astype(np.uint8)


def preview_dataset(root: str | Path, out: str | Path, split: str = "train", count: int = 16,
                    cols: int = 4, size: int = 160, shard_url: str | None = None) -> Path:
    """A PNG grid: each cell the image and, beside it, the image with its mask overlaid
    (``shard_url``: as in :func:`inspect_dataset`)."""
    info = read_dataset_json(root)
    cells = []
    for shard in split_shards(root, split, info, shard_url):
        for raw in iter_shard(shard):
            s = decode_sample(raw)
            img = np.asarray(Image.fromarray(s["image"]).resize((size, size), Image.BILINEAR))
            mask = s.get("mask")
            if mask is not None:
                mask = np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))
                ov = overlay(img, mask, info["palette"])
            else:
                ov = img
            cells.append(np.concatenate([img, ov], 1))
            if len(cells) >= count:
                break
        if len(cells) >= count:
            break
    if not cells:
        raise ValueError(f"{root}: split {split!r} has no samples to preview")
    while len(cells) % cols:
        cells.append(np.zeros_like(cells[0]))
    rows = [np.concatenate(cells[i:i + cols], 1) for i in range(0, len(cells), cols)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, 0)).save(out)
    return out
