"""convert_coco on a tiny COCO-2014 tree written by the tests in the real layout."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pycocotools  # noqa: F401  (installed by the test command: psa-dist[coco])
import pycocotools.mask as mask_utils  # noqa: E402

from psa_dist.data.convert_coco import convert_coco  # noqa: E402
from psa_dist.data.dataset_writer import BuildError  # noqa: E402
from psa_dist.data.shards import decode_sample, iter_split, read_dataset_json  # noqa: E402

# Non-contiguous category ids, listed out of order: sorted by id they must become 1, 2, 3.
CATEGORIES = [{"id": 90, "name": "toothbrush", "supercategory": "indoor"},
              {"id": 1, "name": "person", "supercategory": "person"},
              {"id": 5, "name": "airplane", "supercategory": "vehicle"}]
LABEL = {1: 1, 5: 2, 90: 3}


def rect_polygon(x0, y0, x1, y1):
    """Axis-aligned rectangle polygon; pycocotools fills pixel columns x0..x1-1, rows y0..y1-1."""
    return [float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]


def rect_mask(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def compressed_rle(m: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}


def uncompressed_rle(m: np.ndarray) -> dict:
    """COCO's crowd format, built by hand: run lengths of the column-major pixels, zeros first."""
    flat = m.flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": list(m.shape), "counts": counts}


def _ann(ann_id, image_id, cat, seg, area, crowd=0):
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "segmentation": seg,
            "area": float(area), "iscrowd": crowd, "bbox": [0, 0, 1, 1]}


def make_coco(tmp_path: Path):
    """Returns (root, expected) with expected[split] = [(key, cls, mask), ...] in output order."""
    root = tmp_path / "coco"
    images = {"train2014": [(9, 20, 30), (25, 16, 24), (30, 12, 12), (31, 14, 18)],
              "val2014": [(42, 18, 22)]}
    masks = {}
    # train 9: a big person polygon listed AFTER a small toothbrush (compressed RLE) lying on it,
    # and an airplane crowd region (uncompressed RLE).
    small = rect_mask(20, 30, 8, 8, 11, 10)
    crowd9 = rect_mask(20, 30, 22, 16, 28, 19)
    anns = {"train2014": [
        _ann(1, 9, 90, compressed_rle(small), small.sum()),
        _ann(2, 9, 1, [rect_polygon(2, 3, 20, 15)], 18 * 12),
        _ann(3, 9, 5, uncompressed_rle(crowd9), crowd9.sum(), crowd=1),
        # train 25: one airplane made of two polygons.
        _ann(4, 25, 5, [rect_polygon(1, 1, 5, 4), rect_polygon(10, 8, 20, 14)], 12 + 60),
        # train 30: no annotation at all; train 31: only a crowd region -> both skipped.
        _ann(5, 31, 1, uncompressed_rle(rect_mask(14, 18, 0, 0, 5, 5)), 25, crowd=1)],
        "val2014": [
        # val 42: a small airplane polygon listed after a larger person RLE that covers it.
        _ann(6, 42, 5, [rect_polygon(4, 4, 8, 8)], 16),
        _ann(7, 42, 1, compressed_rle(rect_mask(18, 22, 2, 2, 14, 12)), 120)]}
    m = np.zeros((20, 30), np.uint8)
    m[3:15, 2:20] = 1
    m[small > 0] = 3
    m[crowd9 > 0] = 255
    masks[9] = (m, [1, 3])
    m = np.zeros((16, 24), np.uint8)
    m[1:4, 1:5] = 2
    m[8:14, 10:20] = 2
    masks[25] = (m, [2])
    m = np.zeros((18, 22), np.uint8)
    m[2:12, 2:14] = 1
    m[4:8, 4:8] = 2
    masks[42] = (m, [1, 2])

    expected = {}
    for split, entries in images.items():
        (root / split).mkdir(parents=True)
        records = []
        for image_id, h, w in entries:
            name = f"COCO_{split}_{image_id:012d}.jpg"
            rng = np.random.default_rng(image_id)
            pixels = np.zeros((h, w, 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
            pixels[: h // 2, : w // 3] = rng.integers(0, 255, 3, dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / name, quality=90)
            records.append({"id": image_id, "file_name": name, "height": h, "width": w})
            if image_id in masks:
                expected.setdefault(split, []).append((Path(name).stem, masks[image_id][1],
                                                       masks[image_id][0], root / split / name))
        (root / "annotations").mkdir(exist_ok=True)
        with open(root / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump({"images": records, "annotations": anns[split], "categories": CATEGORIES}, f)
    return root, expected


def test_convert_coco_all_fields_and_worker_independence(tmp_path):
    root, expected = make_coco(tmp_path)
    out1, out2 = tmp_path / "out1", tmp_path / "out2"
    info = convert_coco(root, out1, shard_size=1, workers=1, progress=False)
    assert info["failed"] == []
    assert [(e["split"], e["item"]) for e in info["skipped"]] == [
        ("train2014", "COCO_train2014_000000000030.jpg"),
        ("train2014", "COCO_train2014_000000000031.jpg")]
    assert all("no labels" in e["reason"] for e in info["skipped"])
    for split, samples in expected.items():
        raws = list(iter_split(out1, split))
        assert [r["__key__"] for r in raws] == [key for key, *_ in samples]
        for raw, (key, cls, mask, path) in zip(raws, samples):
            assert {k for k in raw if not k.startswith("__")} == {"jpg", "cls.json", "mask.png",
                                                                  "meta.json"}
            assert raw["jpg"] == path.read_bytes()
            s = decode_sample(raw)
            np.testing.assert_array_equal(s["image"], np.asarray(Image.open(path).convert("RGB")))
            assert s["cls"] == cls, key
            np.testing.assert_array_equal(s["mask"], mask, err_msg=key)
            assert s["meta"] == {"source": f"coco:{key}", "size": list(mask.shape)}

    ds = read_dataset_json(out1)
    assert ds["classes"] == ["person", "airplane", "toothbrush"] and ds["num_classes"] == 3
    assert ds["palette"] == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert ds["splits"] == {
        "train2014": {"count": 2, "shards": [{"name": "train2014-000000.tar", "count": 1},
                                             {"name": "train2014-000001.tar", "count": 1}]},
        "val2014": {"count": 1, "shards": [{"name": "val2014-000000.tar", "count": 1}]}}
    assert ds["source"]["category_ids"] == [1, 5, 90]
    assert ds["source"]["coco_root"] == str(root.resolve())
    assert ds["source"]["splits"] == ["train2014", "val2014"]

    convert_coco(root, out2, shard_size=1, workers=2, progress=False)
    names = sorted(p.name for p in out1.glob("*.tar"))
    assert names == sorted(p.name for p in out2.glob("*.tar")) and len(names) == 3
    for name in names:
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes(), name


def _truncate(root):
    p = root / "train2014" / "COCO_train2014_000000000025.jpg"
    p.write_bytes(p.read_bytes()[:200])
    return "COCO_train2014_000000000025.jpg"


def _size_mismatch(root):
    name = "COCO_train2014_000000000009.jpg"
    Image.new("RGB", (31, 20)).save(root / "train2014" / name)
    return name


def _missing(root):
    (root / "train2014" / "COCO_train2014_000000000009.jpg").unlink()
    return "COCO_train2014_000000000009.jpg"


@pytest.mark.parametrize("breakage", [_truncate, _size_mismatch, _missing])
def test_bad_input_is_reported_and_strict_stops(tmp_path, breakage):
    root, _ = make_coco(tmp_path)
    bad = breakage(root)
    info = convert_coco(root, tmp_path / "out", workers=1, progress=False)
    assert len(info["failed"]) == 1, info["failed"]
    assert info["failed"][0]["item"] == bad and bad in info["failed"][0]["reason"]
    good = {"COCO_train2014_000000000009", "COCO_train2014_000000000025"} - {Path(bad).stem}
    assert [r["__key__"] for r in iter_split(tmp_path / "out", "train2014")] == sorted(good)
    assert info["splits"]["val2014"]["count"] == 1 and len(info["skipped"]) == 2
    with pytest.raises(BuildError, match=bad):
        convert_coco(root, tmp_path / "strict", workers=1, strict=True, progress=False)


def test_splits_with_different_categories_are_refused(tmp_path):
    root, _ = make_coco(tmp_path)
    path = root / "annotations" / "instances_val2014.json"
    data = json.loads(path.read_text())
    data["categories"] = data["categories"][:2]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="other categories"):
        convert_coco(root, tmp_path / "out", workers=1, progress=False)


def test_missing_annotation_file_is_named(tmp_path):
    root, _ = make_coco(tmp_path)
    with pytest.raises(FileNotFoundError, match="instances_test2015.json"):
        convert_coco(root, tmp_path / "out", splits=("test2015",), workers=1, progress=False)


def test_missing_pycocotools_gives_install_hint(tmp_path, monkeypatch):
    for name in ("pycocotools", "pycocotools.mask", "pycocotools.coco"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install 'psa-dist\[coco\]'"):
        convert_coco(tmp_path, tmp_path / "out", workers=1, progress=False)


def test_cli_convert_coco(tmp_path):
    from psa_dist.cli import main
    root, _ = make_coco(tmp_path)
    out = tmp_path / "out"
    assert main(["data", "convert-coco", str(root), "--out", str(out), "--splits", "val2014",
                 "--workers", "1"]) == 0
    assert read_dataset_json(out)["splits"]["val2014"]["count"] == 1
