import hashlib

import numpy as np

from psa_dist.config import SynthConfig
from psa_dist.data.inspect import inspect_dataset, preview_dataset
from psa_dist.data.shards import decode_sample, iter_split, read_dataset_json, split_shards
from psa_dist.data.synth import class_names, render, write_synth


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
