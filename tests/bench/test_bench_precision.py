"""`psa-dist bench precision` on a tiny config: every network's row, its decision the one the
timing gives, the cache shared with what the stages read; run through the CLI."""
import json

import torch

from psa_dist.cli import main
from psa_dist.util.precision import BF16_KEEP_BELOW, cache_path, cpu_has_native_bf16

TINY = ["model.backbone=small", "model.segmenter=light", "model.aff_dims=[8,16,32,64]",
        "model.frozen_layers=[]", "train_cls.batch_size=2", "train_cls.crop_size=32",
        "train_aff.batch_size=2", "train_aff.crop_size=32", "train_seg.batch_size=2",
        "train_seg.crop_size=32"]


def test_bench_precision_names_each_networks_precision(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PSA_DIST_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    out = tmp_path / "precision.json"
    assert main(["bench", "precision", "configs/demo.yaml", *TINY, "--classes", "6",
                 "--threads", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["network"], r["pass"]) for r in rows] == [
        ("cls", "train step"), ("aff", "train step"), ("seg", "train step"), ("cams", "forward")]
    printed = capsys.readouterr().out
    assert "| network | pass |" in printed and all(f"| {r['network']} |" in printed for r in rows)
    assert torch.get_num_threads() == threads
    for r in rows:      # the speed at the precision chosen, timed when no choice timed it
        chosen = r["bf16_s"] if r["precision"] == "bfloat16" else r["float32_s"]
        assert r["crops_per_s"] > 0
        if chosen is not None:
            assert r["crops_per_s"] == round(r["shape"][0] / chosen, 1)
        assert f"| {r['crops_per_s']} |" in printed
    if not cpu_has_native_bf16():
        assert all(r["precision"] == "float32" and r["float32_s"] is None for r in rows)
        return
    for r in rows:      # the decision is the timing's, and the timing is the cache's
        faster = r["bf16_s"] <= BF16_KEEP_BELOW * r["float32_s"]
        assert r["precision"] == ("bfloat16" if faster else "float32"), r
        assert not r["cached"] and r["threads"] == 1
    assert len(json.loads(cache_path().read_text())) == 4
    # again: from the cache (what the stages would read), unless --fresh
    assert main(["bench", "precision", "configs/demo.yaml", *TINY, "--classes", "6",
                 "--threads", "1", "--out", str(out)]) == 0
    again = json.loads(out.read_text())["rows"]
    assert all(r["cached"] for r in again)
    assert [r["precision"] for r in again] == [r["precision"] for r in rows]
    assert main(["bench", "precision", "configs/demo.yaml", *TINY, "--classes", "6",
                 "--threads", "1", "--fresh", "--out", str(out)]) == 0
    assert not any(r["cached"] for r in json.loads(out.read_text())["rows"])
    assert torch.get_num_threads() == threads      # the bench gave this process its threads back


def test_bench_precision_gives_a_speed_where_nothing_was_timed(tmp_path, monkeypatch):
    """amp none (and a CPU without native bf16): no choice times anything, the bench times the
    float32 pass itself; bf16! forced: the bf16 pass."""
    monkeypatch.setenv("PSA_DIST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "precision.json"
    amps = ["train_cls.amp=none", "train_aff.amp=bf16!", "train_seg.amp=none", "cams.amp=none"]
    assert main(["bench", "precision", "configs/demo.yaml", *TINY, *amps, "--classes", "6",
                 "--threads", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["precision"] for r in rows] == ["float32", "bfloat16", "float32", "float32"]
    assert all(r["float32_s"] is None and r["bf16_s"] is None and r["crops_per_s"] > 0
               for r in rows)
    assert not (tmp_path / "cache" / "precision.json").exists()     # nothing chosen by timing
