import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from psa_dist.data.shards import (SampleError, ShardedWriter, ShardError, decode_mask, decode_npy, decode_sample, encode_image, encode_json, encode_mask, encode_npy, iter_shard, write_shard)


def _sample(i, rng):
    img = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    mask = rng.choice(np.array([0, 1, 7, 20, 255], np.uint8), size=(20, 30))
    return {"__key__": f"s{i:03d}", "png": encode_image(img, "png"), "cls.json": encode_json([1, 7]),
            "mask.png": encode_mask(mask), "meta.json": encode_json({"source": "t", "size": [20, 30]})}, img, mask


def test_roundtrip_every_field(tmp_path):
    rng = np.random.default_rng(0)
    samples = [_sample(i, rng) for i in range(5)]
    n = write_shard(tmp_path / "train-000000.tar", [s for s, _, _ in samples])
    assert n == 5
    got = list(iter_shard(tmp_path / "train-000000.tar"))
    assert [g["__key__"] for g in got] == [f"s{i:03d}" for i in range(5)]
    for g, (_, img, mask) in zip(got, samples):
        d = decode_sample(g)
        np.testing.assert_array_equal(d["image"], img)       # png is lossless
        np.testing.assert_array_equal(d["mask"], mask)       # class ids and 255 preserved exactly
        assert d["cls"] == [1, 7] and d["meta"] == {"size": [20, 30], "source": "t"}
    assert not list(tmp_path.glob(".*tmp"))


def test_palette_png_mask_is_refused():
    # A palette PNG decoded as "L" maps by luminance and corrupts ids: we refuse it outright.
    im = Image.fromarray(np.array([[0, 1], [2, 255]], np.uint8), "P")
    im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 9))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    with pytest.raises(ValueError, match="mode 'L'"):
        decode_mask(buf.getvalue())


def test_npy_float16_roundtrip():
    a = np.random.default_rng(1).random((3, 5, 7)).astype(np.float32)
    b = decode_npy(encode_npy(a))
    assert b.dtype == np.float16 and b.shape == a.shape
    np.testing.assert_allclose(b, a, atol=1e-3)


def test_truncated_shard_names_the_shard(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "train-000003.tar"
    write_shard(path, [_sample(i, rng)[0] for i in range(4)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ShardError, match="train-000003.tar"):
        list(iter_shard(path))
    with pytest.raises(ShardError, match="not found"):
        list(iter_shard(tmp_path / "missing.tar"))


def test_corrupt_image_names_key_and_field(tmp_path):
    rng = np.random.default_rng(0)
    s, _, _ = _sample(0, rng)
    s["png"] = s["png"][:40]
    write_shard(tmp_path / "x.tar", [s])
    raw = next(iter_shard(tmp_path / "x.tar"))
    with pytest.raises(SampleError, match=r"'s000'.*x\.tar.*image"):
        decode_sample(raw)


def test_failed_write_leaves_nothing(tmp_path):
    def gen():
        yield {"__key__": "a", "cls.json": b"[]"}
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        write_shard(tmp_path / "t.tar", gen())
    assert list(tmp_path.iterdir()) == []


def test_sharded_writer_cuts_shards(tmp_path):
    with ShardedWriter(tmp_path, "val", 3) as w:
        for i in range(7):
            w.write({"__key__": f"k{i}", "cls.json": encode_json([i])})
    assert w.shards == [{"name": "val-000000.tar", "count": 3}, {"name": "val-000001.tar", "count": 3},
                        {"name": "val-000002.tar", "count": 1}]
    with tarfile.open(tmp_path / "val-000001.tar") as tf:
        assert tf.getnames() == ["k3.cls.json", "k4.cls.json", "k5.cls.json"]
    assert json.loads(next(iter_shard(tmp_path / "val-000002.tar"))["cls.json"]) == [6]


# ----------------------------------------------------------------------------- util/atomic.py
# The one atomic writer behind write_shard, checkpoints, markers and eval parts.

def test_failed_rewrite_keeps_the_old_shard_and_leaves_no_temporary(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "train-000000.tar"
    write_shard(path, [_sample(i, rng)[0] for i in range(3)])
    before = path.read_bytes()

    def gen():
        yield _sample(9, rng)[0]
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        write_shard(path, gen())
    assert path.read_bytes() == before                      # the old shard, whole
    assert [p.name for p in tmp_path.iterdir()] == [path.name]   # no .tmp left beside it
    assert [s["__key__"] for s in iter_shard(path)] == ["s000", "s001", "s002"]


def test_atomic_forms_write_whole_files_or_nothing(tmp_path):
    import torch

    from psa_dist.nets.checkpoint import load_checkpoint, save_checkpoint
    from psa_dist.util.atomic import atomic_open, atomic_path, atomic_write_json

    target = tmp_path / "sub" / "x.bin"
    data = bytes(range(256)) * 4096                          # 1 MiB, written in pieces
    with atomic_open(target, "wb") as f:
        for i in range(0, len(data), 4096):
            f.write(data[i:i + 4096])
        assert not target.exists()                           # nothing under the name until the end
    assert target.read_bytes() == data
    with pytest.raises(ValueError, match="half"):
        with atomic_open(target, "wb") as f:
            f.write(b"half")
            raise ValueError("half")
    assert target.read_bytes() == data
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_path(tmp_path / "never.bin"):
            pass                                             # a writer that wrote nothing
    atomic_write_json(tmp_path / "m.json", {"b": 1, "a": [1, 2]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": [1, 2], "b": 1}
    ck = tmp_path / "ck.pth"
    save_checkpoint(ck, {"model": {"w": torch.arange(5.0)}, "step": 3})
    with pytest.raises(AttributeError, match="pickle"):     # fails halfway through the save
        save_checkpoint(ck, {"model": {"w": torch.zeros(1)}, "bad": lambda: 0})
    assert load_checkpoint(ck)["step"] == 3 and torch.equal(load_checkpoint(ck)["model"]["w"],
                                                            torch.arange(5.0))
    left = sorted(p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp"))
    assert left == [], left
