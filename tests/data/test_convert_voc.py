"""convert_voc on a tiny VOC2012 + SBD tree written by the tests in the real layout."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from psa_dist.cli import main
from psa_dist.data.convert_voc import convert_voc
from psa_dist.data.dataset_writer import BuildError
from psa_dist.data.shards import decode_sample, iter_split, read_dataset_json

VOC_NAMES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
             "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
             "train", "tvmonitor"]
# The published VOC colour map, written out (not computed) so the test is independent of the code.
VOC_PALETTE = [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128], [128, 0, 128],
               [0, 128, 128], [128, 128, 128], [64, 0, 0], [192, 0, 0], [64, 128, 0], [192, 128, 0],
               [64, 0, 128], [192, 0, 128], [64, 128, 128], [192, 128, 128], [0, 64, 0],
               [128, 64, 0], [0, 192, 0], [128, 192, 0], [0, 64, 128]]


def _image(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8) + rng.integers(0, 255, size=3, dtype=np.uint8)
    img[h // 4: h // 2, w // 3: w - 2] = rng.integers(0, 255, size=3, dtype=np.uint8)
    return img


def _mask(h: int, w: int, classes: list[int]) -> np.ndarray:
    """Background with one rectangle per class, each ringed by a 1-pixel 255 boundary."""
    m = np.zeros((h, w), np.uint8)
    for k, c in enumerate(classes):
        y0, x0 = 1 + 4 * k, 1 + 3 * k
        m[y0: y0 + 6, x0: x0 + 8] = 255
        m[y0 + 1: y0 + 5, x0 + 1: x0 + 7] = c
    return m


def _save_palette_png(path: Path, mask: np.ndarray) -> None:
    im = Image.fromarray(mask, "P")
    flat = [v for rgb in VOC_PALETTE for v in rgb] + [224, 224, 192] * (256 - len(VOC_PALETTE))
    im.putpalette(flat)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    assert Image.open(path).mode == "P"


def _save_xml(path: Path, names: list[str]) -> None:
    objects = "".join(f"<object><name>{n}</name><difficult>0</difficult></object>" for n in names)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><filename>{path.stem}.jpg</filename>{objects}</annotation>")


def _write_list(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


# id -> (H, W, classes in the SegmentationClass mask (None: no mask), XML names)
IMAGES = {
    "2007_000001": (18, 26, [1, 15], ["aeroplane", "person"]),
    "2007_000002": (20, 24, [7, 12], ["car", "dog"]),
    "2008_000003": (16, 22, None, ["dog", "person", "dog"]),
    "2009_000004": (22, 28, [3], ["bird"]),
    "2010_000005": (18, 30, [20, 9], ["tvmonitor", "chair"]),
}
SBD_AUG = {"2007_000001": [5, 15]}   # SBD mask differs from SegmentationClass: it must win


def make_voc(tmp_path: Path) -> tuple[Path, Path]:
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    sbd = tmp_path / "SBD"
    for n, (image_id, (h, w, classes, names)) in enumerate(IMAGES.items()):
        (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(_image(h, w, n)).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=85)
        _save_xml(voc / "Annotations" / f"{image_id}.xml", names)
        if classes is not None:
            _save_palette_png(voc / "SegmentationClass" / f"{image_id}.png", _mask(h, w, classes))
    for image_id, classes in SBD_AUG.items():
        h, w = IMAGES[image_id][:2]
        (sbd / "SegmentationClassAug").mkdir(parents=True, exist_ok=True)
        Image.fromarray(_mask(h, w, classes), "L").save(sbd / "SegmentationClassAug" / f"{image_id}.png")
    seg = voc / "ImageSets" / "Segmentation"
    _write_list(seg / "train.txt", ["2007_000001", "2007_000002"])
    _write_list(seg / "val.txt", ["2009_000004", "2010_000005"])
    _write_list(seg / "trainval.txt", ["2007_000001", "2007_000002", "2009_000004", "2010_000005"])
    # DeepLab-style SBD list: "/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png"
    _write_list(sbd / "train_aug.txt", [f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png"
                                        for i in ("2007_000001", "2007_000002", "2008_000003")])
    return voc, sbd


def expected(voc: Path, sbd: Path, split: str, image_id: str) -> dict:
    """What the sample of ``image_id`` must hold, from the source files and the fixture tables."""
    h, w, classes, names = IMAGES[image_id]
    jpg = (voc / "JPEGImages" / f"{image_id}.jpg").read_bytes()
    out = {"jpg": jpg, "image": np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")),
           "meta": {"source": f"voc:{image_id}", "size": [h, w]}}
    if split == "train_aug" and image_id in SBD_AUG:
        classes = SBD_AUG[image_id]
    if classes is None:
        out["cls"] = sorted({VOC_NAMES.index(n) + 1 for n in names})
    else:
        out["mask"] = _mask(h, w, classes)
        out["cls"] = sorted(classes)
    return out


def check_split(out: Path, voc: Path, sbd: Path, split: str, ids: list[str]) -> None:
    raws = list(iter_split(out, split))
    assert [r["__key__"] for r in raws] == ids
    for raw in raws:
        exp = expected(voc, sbd, split, raw["__key__"])
        fields = {k for k in raw if not k.startswith("__")}
        assert fields == {"jpg", "cls.json", "meta.json"} | ({"mask.png"} if "mask" in exp else set())
        assert raw["jpg"] == exp["jpg"]                     # original bytes passed through
        s = decode_sample(raw)
        np.testing.assert_array_equal(s["image"], exp["image"])
        assert s["cls"] == exp["cls"]
        assert s["meta"] == exp["meta"]
        if "mask" in exp:
            np.testing.assert_array_equal(s["mask"], exp["mask"])   # ids and 255 kept exactly
            assert 255 in s["mask"]
        else:
            assert "mask" not in s


def test_convert_voc_all_fields_and_worker_independence(tmp_path):
    voc, sbd = make_voc(tmp_path)
    out1, out2 = tmp_path / "out1", tmp_path / "out2"
    info = convert_voc(voc, out1, splits=("train_aug", "val"), sbd_root=sbd, shard_size=2,
                       workers=1, progress=False)
    assert info["failed"] == [] and info["skipped"] == []
    check_split(out1, voc, sbd, "train_aug", ["2007_000001", "2007_000002", "2008_000003"])
    check_split(out1, voc, sbd, "val", ["2009_000004", "2010_000005"])

    ds = read_dataset_json(out1)
    assert ds["classes"] == VOC_NAMES and ds["num_classes"] == 20
    assert ds["palette"] == VOC_PALETTE
    assert ds["splits"] == {
        "train_aug": {"count": 3, "shards": [{"name": "train_aug-000000.tar", "count": 2},
                                             {"name": "train_aug-000001.tar", "count": 1}]},
        "val": {"count": 2, "shards": [{"name": "val-000000.tar", "count": 2}]}}
    assert ds["source"]["kind"] == "voc" and ds["source"]["splits"] == ["train_aug", "val"]
    assert ds["source"]["voc_root"] == str(voc.resolve())
    assert ds["source"]["sbd_root"] == str(sbd.resolve())
    assert ds["source"]["lists"]["train_aug"] == str((sbd / "train_aug.txt").resolve())

    convert_voc(voc, out2, splits=("train_aug", "val"), sbd_root=sbd, shard_size=2, workers=2,
                progress=False)
    names = sorted(p.name for p in out1.glob("*.tar"))
    assert names == sorted(p.name for p in out2.glob("*.tar")) and len(names) == 3
    for name in names:
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes(), name


def test_train_aug_without_sbd_uses_segmentation_class_and_xml(tmp_path):
    voc, sbd = make_voc(tmp_path)
    _write_list(voc / "ImageSets" / "Segmentation" / "train_aug.txt",
                ["2007_000001", "2008_000003"])     # preferred over SBD's list
    out = tmp_path / "out"
    info = convert_voc(voc, out, splits=("train_aug",), shard_size=10, workers=1, progress=False)
    assert info["failed"] == []
    raws = list(iter_split(out, "train_aug"))
    assert [r["__key__"] for r in raws] == ["2007_000001", "2008_000003"]
    first = decode_sample(raws[0])
    np.testing.assert_array_equal(first["mask"], _mask(18, 26, [1, 15]))  # SegmentationClass
    assert first["cls"] == [1, 15]
    assert "mask.png" not in raws[1] and decode_sample(raws[1])["cls"] == [12, 15]


def test_missing_train_aug_list_names_every_path(tmp_path):
    voc, sbd = make_voc(tmp_path)
    (sbd / "train_aug.txt").unlink()
    with pytest.raises(FileNotFoundError) as e:
        convert_voc(voc, tmp_path / "out", splits=("train_aug",), sbd_root=sbd, workers=1,
                    progress=False)
    assert str(voc / "ImageSets" / "Segmentation" / "train_aug.txt") in str(e.value)
    assert str(sbd / "train_aug.txt") in str(e.value)
    with pytest.raises(FileNotFoundError, match="--sbd-root"):
        convert_voc(voc, tmp_path / "out", splits=("train_aug",), workers=1, progress=False)


def test_repeated_id_in_list_is_an_error(tmp_path):
    voc, _ = make_voc(tmp_path)
    _write_list(voc / "ImageSets" / "Segmentation" / "val.txt", ["2009_000004", "2009_000004"])
    with pytest.raises(ValueError, match="listed twice"):
        convert_voc(voc, tmp_path / "out", splits=("val",), workers=1, progress=False)


def _truncate_jpeg(voc, sbd):
    p = voc / "JPEGImages" / "2009_000004.jpg"
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    return "val", "2009_000004", "2009_000004.jpg"


def _mask_of_other_size(voc, sbd):
    _save_palette_png(voc / "SegmentationClass" / "2010_000005.png", _mask(17, 30, [20]))
    return "val", "2010_000005", "2010_000005.png"


def _unknown_class(voc, sbd):
    _save_xml(voc / "Annotations" / "2008_000003.xml", ["dog", "unicorn"])
    return "train_aug", "2008_000003", "2008_000003.xml"


def _missing_image(voc, sbd):
    (voc / "JPEGImages" / "2007_000002.jpg").unlink()
    return "train_aug", "2007_000002", "2007_000002.jpg"


def _missing_val_mask(voc, sbd):
    (voc / "SegmentationClass" / "2009_000004.png").unlink()
    return "val", "2009_000004", "2009_000004.png"


def _missing_xml(voc, sbd):
    (voc / "Annotations" / "2008_000003.xml").unlink()
    return "train_aug", "2008_000003", "2008_000003.xml"


@pytest.mark.parametrize("breakage", [_truncate_jpeg, _mask_of_other_size, _unknown_class,
                                      _missing_image, _missing_val_mask, _missing_xml])
def test_bad_input_is_reported_and_strict_stops(tmp_path, breakage):
    voc, sbd = make_voc(tmp_path)
    split, bad_id, bad_file = breakage(voc, sbd)
    info = convert_voc(voc, tmp_path / "out", splits=("train_aug", "val"), sbd_root=sbd,
                       workers=1, progress=False)
    assert len(info["failed"]) == 1, info["failed"]
    entry = info["failed"][0]
    assert entry["split"] == split and bad_id in entry["item"] and bad_file in entry["reason"]
    if breakage is _unknown_class:
        assert "unicorn" in entry["reason"]
    written = {s: [r["__key__"] for r in iter_split(tmp_path / "out", s)] for s in ("train_aug", "val")}
    all_ids = {"train_aug": ["2007_000001", "2007_000002", "2008_000003"],
               "val": ["2009_000004", "2010_000005"]}
    for s, ids in all_ids.items():
        assert written[s] == [i for i in ids if not (s == split and i == bad_id)]
    with pytest.raises(BuildError, match=bad_file):
        convert_voc(voc, tmp_path / "strict", splits=("train_aug", "val"), sbd_root=sbd,
                    workers=1, strict=True, progress=False)


def test_cli_convert_voc(tmp_path):
    voc, _ = make_voc(tmp_path)
    out = tmp_path / "out"
    root = tmp_path / "VOCdevkit"          # the VOCdevkit directory is accepted too
    assert main(["data", "convert-voc", str(root), "--out", str(out), "--splits", "train,val",
                 "--workers", "1"]) == 0
    ds = read_dataset_json(out)
    assert {s: v["count"] for s, v in ds["splits"].items()} == {"train": 2, "val": 2}
    assert [r["__key__"] for r in iter_split(out, "train")] == ["2007_000001", "2007_000002"]
