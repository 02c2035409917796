import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest

from psa_dist.config import ConfigError, SynthConfig, load_config
from psa_dist.data.dataset_view import inspect_dataset, preview_dataset
from psa_dist.data.shards import decode_sample, iter_split, read_dataset_json, split_shards
from psa_dist.data.synth import class_names, image_shape, palette, render, write_synth


def test_render_is_deterministic_and_consistent():
    cfg = SynthConfig(image_size=96)
    a = render(cfg, "train", 5)
    b = render(cfg, "train", 5)
    c = render(cfg, "val", 5)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])
    for i in range(20):
        img, mask, present = render(cfg, "train", i)
        assert img.shape == (96, 96, 3) and img.dtype == np.uint8 and mask.shape == (96, 96)
        assert present == sorted(set(np.unique(mask).tolist()) - {0})
        assert 1 <= len(present) <= cfg.max_objects
        assert set(np.unique(mask).tolist()) <= set(range(cfg.num_classes + 1))


def test_objects_are_large_and_elongated():
    # The benchmark needs objects spanning many stride-8 cells (BENCHMARK-NOTES: >= 10 cells).
    cfg = SynthConfig(image_size=160)
    spans = []
    for i in range(30):
        _, mask, present = render(cfg, "train", i)
        for c in present:
            ys, xs = np.nonzero(mask == c)
            spans.append(max(np.ptp(ys), np.ptp(xs)) / 8)
    assert np.median(spans) >= 9


def test_class_pattern_is_on_the_part_and_faint_on_the_body():
    # Texture energy (local high-pass) is much larger on the discriminative part than on the body.
    cfg = SynthConfig(image_size=160, clutter_noise=0.0, max_objects=1)
    strong = SynthConfig(image_size=160, clutter_noise=0.0, max_objects=1, body_pattern=0.55)
    def body_energy(c):
        img, mask, _ = render(c, "train", 3)
        g = img.astype(np.float32).mean(-1)
        hp = np.abs(g - (np.roll(g, 2, 0) + np.roll(g, -2, 0) + np.roll(g, 2, 1) + np.roll(g, -2, 1)) / 4)
        inner = mask > 0
        for ax in (0, 1):
            for s in (-3, 3):
                inner &= np.roll(mask > 0, s, ax)
        return hp[inner].mean()
    assert body_energy(cfg) < 0.6 * body_energy(strong)


def test_write_synth_parallel_equals_serial(tmp_path):
    cfg = SynthConfig(image_size=64, num_train=12, num_val=5)
    info1 = write_synth(cfg, tmp_path / "a", shard_size=5, workers=1, progress=False)
    write_synth(cfg, tmp_path / "b", shard_size=5, workers=2, progress=False)
    for split, n in (("train", 12), ("val", 5)):
        sa, sb = split_shards(tmp_path / "a", split), split_shards(tmp_path / "b", split)
        assert [s.name for s in sa] == [s.name for s in sb]
        for x, y in zip(sa, sb):
            assert hashlib.sha256(x.read_bytes()).digest() == hashlib.sha256(y.read_bytes()).digest()
        assert info1["splits"][split]["count"] == n
    info = read_dataset_json(tmp_path / "a")
    assert info["classes"] == class_names(cfg) and len(info["palette"]) == cfg.num_classes + 1
    assert [s["count"] for s in info["splits"]["train"]["shards"]] == [5, 5, 2]
    assert info["provenance"]["versions"]["torch"]
    keys = [decode_sample(r, ["cls"])["key"] for r in iter_split(tmp_path / "a", "train")]
    assert len(set(keys)) == 12


def test_inspect_and_preview(tmp_path):
    cfg = SynthConfig(image_size=64, num_train=10, num_val=4)
    write_synth(cfg, tmp_path / "d", shard_size=4, workers=1, progress=False)
    rep = inspect_dataset(tmp_path / "d")
    assert rep["problems"] == []
    assert rep["splits"]["train"]["samples"] == 10 and rep["splits"]["val"]["samples"] == 4
    hist = rep["splits"]["train"]["images_per_class"]
    expected = {n: 0 for n in class_names(cfg)}
    for r in iter_split(tmp_path / "d", "train"):
        for c in decode_sample(r, ["cls"])["cls"]:
            expected[class_names(cfg)[c - 1]] += 1
    assert hist == expected
    # A truncated shard shows up as a problem naming it.
    shard = split_shards(tmp_path / "d", "val")[0]
    shard.write_bytes(shard.read_bytes()[:3000])
    rep = inspect_dataset(tmp_path / "d")
    assert any(shard.name in p for p in rep["problems"])
    out = preview_dataset(tmp_path / "d", tmp_path / "p.png", count=6, cols=3, size=32)
    from PIL import Image
    assert Image.open(out).size == (3 * 64, 2 * 32)


def test_object_width_and_object_report():
    # synth.object_width sets how wide objects are; asking render for the per-object report
    # leaves the sample unchanged.
    narrow = SynthConfig(image_size=96, max_objects=1, object_width=(0.15, 0.15))
    wide = SynthConfig(image_size=96, max_objects=1, object_width=(0.3, 0.3))
    area = lambda c: np.mean([(render(c, "train", i)[1] > 0).sum() for i in range(10)])
    assert area(wide) > 1.5 * area(narrow)
    objs: list = []
    a, b = render(wide, "train", 4), render(wide, "train", 4, objs)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert len(objs) == 1 and objs[0]["cls"] in a[2] and isinstance(objs[0]["part_shown"], bool)


# ----------------------------------------------------------- VOC- and COCO-shaped data (issue #17)
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _digest(cfg, split, n):
    h = hashlib.sha256()
    for i in range(n):
        img, mask, present = render(cfg, split, i)
        h.update(img.tobytes())
        h.update(mask.tobytes())
        h.update(bytes(present))
    return h.hexdigest()


def test_default_output_is_unchanged_by_the_shape_knobs():
    # Digests written down from the generator before size_range, aspect_range, classes_per_image
    # and object_scale existed (the parent commit's synth.py): at their defaults they draw nothing,
    # so the demo's data stays the same bytes. (A change of Pillow's resize or drawing would move
    # them too: regenerate with the old generator to tell which it was.)
    demo = SynthConfig(image_size=128, max_objects=2, object_width=(0.22, 0.32), body_pattern=0.4,
                       part_prob=0.6)
    assert _digest(SynthConfig(image_size=64), "train", 6) == \
        "ee43ecbec8ff5dccb4be0b73f84c0bff2789b64fa1dee6937d03b5ff6c2f6b79"
    assert _digest(demo, "val", 3) == \
        "ad26fc1692fc04fb066686b4a5bee1d6f45ac2d1fa8fba768e6d6734d885c2b3"
    assert _digest(SynthConfig(image_size=48, mark="texture", num_classes=8, max_objects=4),
                   "train", 4) == "7c8684a63c79a1ec54e1e05d129e94f0d45001769c5d97bb309348f064fa3aeb"
    # each knob set to its single value is the default, and draws nothing either
    same = SynthConfig(image_size=64, size_range=(64, 64), aspect_range=(1.0, 1.0),
                       object_scale=(1.0, 1.0))
    assert _digest(same, "train", 3) == _digest(SynthConfig(image_size=64), "train", 3)


def _shaped(name: str) -> SynthConfig:
    return load_config(CONFIGS / f"{name}_rehearsal.yaml").synth


@pytest.mark.parametrize("name,long_max,classes", [("voc", 500, 20), ("coco", 640, 80)])
def test_shaped_sizes_and_aspects_are_in_the_asked_ranges(name, long_max, classes):
    cfg = _shaped(name)
    assert cfg.num_classes == classes and cfg.size_range[1] <= long_max
    shapes = [image_shape(np.random.default_rng([cfg.seed, 1, i]), cfg) for i in range(500)]
    longs = np.array([max(s) for s in shapes])
    aspects = np.array([w / h for h, w in shapes])
    lo, hi = cfg.size_range
    assert longs.min() >= lo and longs.max() <= hi
    assert longs.min() < lo + 0.05 * (hi - lo) and longs.max() > hi - 0.05 * (hi - lo)
    a_lo, a_hi = cfg.aspect_range
    short = np.array([min(s) for s in shapes])
    slack = 0.5 / short * np.maximum(aspects, 1 / aspects)     # the short side is rounded
    assert np.all(aspects >= a_lo * (1 - slack)) and np.all(aspects <= a_hi * (1 + slack))
    assert aspects.min() < a_lo * 1.1 and aspects.max() > a_hi / 1.1    # both ends reached
    assert 0.3 < np.mean(aspects > 1) < 0.7                 # landscape and portrait alike
    if name == "voc":       # VOC: long side up to 500, from about 1:2 to 2:1
        assert cfg.aspect_range == (0.5, 2.0)
    for i in range(2):      # render draws its shape first: the images have these shapes
        img, mask, _ = render(cfg, "train", i)
        assert img.shape == shapes[i] + (3,) and mask.shape == shapes[i]


@pytest.mark.parametrize("name", ["voc", "coco"])
def test_shaped_objects_counts_sizes_classes_and_masks(name):
    cfg = _shaped(name)
    counts, distinct, visible, small, large, spread = [], [], [], 0, 0, []
    for i in range(12):
        objs: list = []
        img, mask, present = render(cfg, "train", i, objs)
        counts.append(len(objs))
        # the mask is the objects painted in order, each over the earlier ones (naive repaint)
        naive = np.zeros(mask.shape, np.uint8)
        for o in objs:
            naive[o["inside"]] = o["cls"]
        np.testing.assert_array_equal(mask, naive)
        assert present == sorted(set(np.unique(mask).tolist()) - {0})
        assert set(present) <= {o["cls"] for o in objs}
        assert max(present) <= cfg.num_classes
        distinct.append(len({o["cls"] for o in objs}))
        lo, hi = cfg.classes_per_image
        assert min(lo, len(objs)) <= distinct[-1] <= min(hi, len(objs))
        visible.append(len(present))
        areas = [int(o["inside"].sum()) for o in objs]     # before later objects covered it
        small += sum(0 < a < 32 * 32 for a in areas)
        large += sum(a > 0.05 * mask.size for a in areas)
        if len(areas) > 1:
            spread.append(max(areas) / max(min(areas), 1))
    assert all(cfg.min_objects <= c <= cfg.max_objects for c in counts)
    assert min(counts) <= 2 and max(counts) >= 5
    assert small >= 3 and large >= 3        # small objects (COCO's < 32x32) and large ones
    assert max(spread) > 10                 # very different sizes within one image
    assert np.mean(visible) > 1.4 and max(visible) >= 3    # several classes per image


def test_80_classes_names_palette_and_class_marks():
    cfg = SynthConfig(num_classes=80)
    names = class_names(cfg)
    assert len(set(names)) == 80 and names[:8] == class_names(SynthConfig(num_classes=8))
    assert names[8] == "bars-2" and names[79] == "grid-10"
    pal = palette(80)
    assert len(pal) == 81 and pal[0] == [0, 0, 0]
    assert len({tuple(c) for c in pal}) == 81 and all(0 <= v <= 255 for c in pal for v in c)
    # texture marks have no colour to tell classes that share a pattern apart
    with pytest.raises(ConfigError, match="synth.num_classes"):
        class_names(SynthConfig(num_classes=9, mark="texture"))


def test_shaped_shards_hold_images_of_their_own_sizes(tmp_path):
    cfg = dataclasses.replace(_shaped("coco"), num_train=5, num_val=2)
    write_synth(cfg, tmp_path / "d", shard_size=3, workers=1, progress=False)
    info = read_dataset_json(tmp_path / "d")
    assert len(info["classes"]) == 80 and len(info["palette"]) == 81
    shapes = []
    for r in iter_split(tmp_path / "d", "train"):
        s = decode_sample(r)
        h, w = s["image"].shape[:2]
        assert s["mask"].shape == (h, w) and s["meta"]["size"] == [h, w]
        assert s["cls"] == sorted(set(np.unique(s["mask"]).tolist()) - {0})
        assert max(h, w) <= 640
        shapes.append((h, w))
    assert len(shapes) == 5 and len(set(shapes)) == 5


@pytest.mark.parametrize("key,value", [("size_range", (500, 300)), ("aspect_range", (2.0, 0.5)),
                                       ("classes_per_image", (0, 2)), ("object_scale", (0.0, 1.0)),
                                       ("size_range", (300, 400, 500)), ("mark", "paint")])
def test_bad_shape_knobs_are_refused_naming_the_key(key, value, tmp_path):
    cfg = dataclasses.replace(SynthConfig(num_train=1, num_val=1), **{key: value})
    with pytest.raises(ConfigError, match=f"synth.{key}"):
        write_synth(cfg, tmp_path / "d", workers=1, progress=False)
    assert not (tmp_path / "d" / "dataset.json").exists()


def _demo_cfg(tmp_path, **synth):
    from psa_dist.config import load_config as load
    return load(CONFIGS / "demo.yaml", [f"data.root={tmp_path / 'd'}", "synth.num_train=4",
                                        "synth.num_val=2", "data.shard_size=4", "data.workers=1",
                                        *(f"synth.{k}={v}" for k, v in synth.items())])


def test_dataset_made_before_a_synth_key_existed_is_kept(tmp_path):
    # a dataset.json written before e.g. object_scale existed lacks the key; its default
    # reproduces that data, so the dataset is the config's and must not be generated anew
    import json
    from psa_dist.stages.run_dir import ensure_dataset
    cfg = _demo_cfg(tmp_path)
    root = ensure_dataset(cfg)
    meta = json.loads((root / "dataset.json").read_text())
    for key in ("object_scale", "size_range", "aspect_range", "classes_per_image"):
        meta["source"]["synth"].pop(key)
    (root / "dataset.json").write_text(json.dumps(meta))
    marker = root / "kept.txt"
    marker.write_text("x")
    assert ensure_dataset(cfg) == root and marker.is_file()
    # a setting that does differ still regenerates it
    ensure_dataset(_demo_cfg(tmp_path, seed=3))
    assert not marker.is_file()
    assert json.loads((root / "dataset.json").read_text())["source"]["synth"]["seed"] == 3
