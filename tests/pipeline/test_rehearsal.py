"""The rehearsal configs (configs/voc_rehearsal.yaml, configs/coco_rehearsal.yaml): the paper
configs' models and settings with only the amount of work cut, on VOC- and COCO-shaped synthetic
data.

Every setting that decides what the pipeline computes is checked against the paper config it
rehearses; then each rehearsal, cut further to three small images of varying size (the backbones,
the 448-channel AffinityNet, stride 8, the walk's t 256, the CRF and DeepLabV3 as written), runs
end to end through ``run_pipeline``, and every stage's outputs are checked: markers, one CAM,
affinity label and pseudo label per image at that image's own size, the trainers' logs and the
report.
"""
import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from psa_dist.config import load_config
from psa_dist.core.affinity import cell_grid
from psa_dist.data.shards import decode_sample, iter_joined, read_dataset_json, split_shards
from psa_dist.pipeline import run_pipeline
from psa_dist.stages import table

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
REHEARSES = {"voc_rehearsal": "voc_resnet38", "coco_rehearsal": "coco_resnet50"}
IRN_REHEARSES = {"voc_rehearsal": "voc_irn", "coco_rehearsal": "coco_irn"}     # with method=irn
CLASSES = {"voc_rehearsal": 20, "coco_rehearsal": 80}
# What a run computes, per trainer (not how much of it, nor where it runs)
TRAIN_SETTINGS = ("lr", "weight_decay", "momentum", "crop_size", "resize_long", "color_jitter",
                  "amp", "missing_class_frac", "pair_border", "stop_patience", "fit_target")


@pytest.mark.parametrize("name", sorted(REHEARSES))
def test_rehearsal_keeps_the_paper_configs_models_and_settings(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    paper = load_config(CONFIGS / f"{REHEARSES[name]}.yaml")
    assert cfg.data.source == "synth" and paper.data.source != "synth"
    assert cfg.model.pretrained is None and cfg.model.seg_pretrained is None   # random init
    mine = dataclasses.asdict(cfg.model)
    theirs = dataclasses.asdict(paper.model)
    for key in ("pretrained", "seg_pretrained"):
        mine.pop(key), theirs.pop(key)
    # frozen BN keeps pretrained statistics; from random weights there are none to keep (the
    # trainer warns, and the segmenter diverged to NaN in the first real-size rehearsal)
    assert theirs.pop("freeze_bn") and not mine.pop("freeze_bn")
    assert mine == theirs
    for section in ("cams", "aff_labels", "random_walk"):
        a, b = dataclasses.asdict(getattr(cfg, section)), dataclasses.asdict(getattr(paper, section))
        a.pop("batch_size", None), b.pop("batch_size", None)
        assert a == b, section
    for t in ("train_cls", "train_aff", "train_seg"):
        for key in TRAIN_SETTINGS:
            assert getattr(getattr(cfg, t), key) == getattr(getattr(paper, t), key), f"{t}.{key}"
    assert not cfg.train_aff.resize_long        # the authors do not rescale for AffinityNet
    assert cfg.seg_full == paper.seg_full
    # method=irn: IRN's label stages and training as its paper config (the models are the
    # rehearsal's: IRN's boundary branch reads the trained classifier's backbone)
    irn = load_config(CONFIGS / f"{IRN_REHEARSES[name]}.yaml")
    for section in ("ir_labels", "irn_walk"):
        assert dataclasses.asdict(getattr(cfg, section)) == dataclasses.asdict(getattr(irn, section))
    for key in TRAIN_SETTINGS:
        assert getattr(cfg.train_irn, key) == getattr(irn.train_irn, key), f"train_irn.{key}"
    assert cfg.model.irn_radius == irn.model.irn_radius and cfg.model.irn_backbone == "classifier"
    # only the amount of work is cut: a dozen or two images in at least two train shards (the
    # pool's sharding runs as it would), one epoch each, a 2-core machine
    assert 8 <= cfg.synth.num_train <= 24 and 4 <= cfg.synth.num_val <= 8
    assert cfg.synth.num_train >= 2 * cfg.data.shard_size
    assert cfg.synth.num_classes == CLASSES[name] and cfg.synth.size_range is not None
    for t in ("train_cls", "train_aff", "train_irn", "train_seg"):
        tc = getattr(cfg, t)
        assert tc.epochs == 1 and tc.launcher in ("inline", "local") and tc.cpus_per_task <= 2


def cut(tmp: Path) -> list[str]:
    """The rehearsal on three images of 64-96 px (its aspects, objects and classes as written), in
    two shards, crops of 64, two CAM scales, label stages in this process (Ray is tested
    elsewhere): the models and every other setting stay the rehearsal's."""
    over = [f"out_dir={tmp / 'run'}", f"data.root={tmp / 'data'}", "data.workers=1",
            "synth.num_train=3", "synth.num_val=2", "data.shard_size=2",
            "synth.size_range=[64,96]", "cams.scales=[1.0,0.5]", "ray.enabled=false"]
    for t in ("train_cls", "train_aff", "train_irn", "train_seg"):
        over += [f"{t}.crop_size=64", f"{t}.batch_size=2", f"{t}.num_workers=0"]
    return over + ["train_cls.resize_long=[64,96]", "train_seg.resize_long=[64,96]",
                   "train_irn.resize_long=[64,96]"]


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("name,method", [("voc_rehearsal", "psa"), ("coco_rehearsal", "psa"),
                                         ("voc_rehearsal", "irn")])
def test_rehearsal_cut_runs_every_stage(name, method, tmp_path):
    cfg = load_config(CONFIGS / f"{name}.yaml", cut(tmp_path) + [f"method={method}"])
    assert cfg.model.backbone in ("resnet38", "resnet50") and cfg.random_walk.t == 256
    assert cfg.aff_labels.crf and cfg.model.segmenter == "deeplabv3_resnet50"
    assert cfg.irn_walk.t == 256 and cfg.ir_labels.crf
    try:
        assert run_pipeline(cfg) == 0
        _check_outputs(cfg, tmp_path / "data", tmp_path / "run")
    finally:    # ResNet-38's checkpoints are most of a gigabyte each
        shutil.rmtree(tmp_path / "run", ignore_errors=True)


def _check_outputs(cfg, data: Path, run: Path) -> None:
    """Every stage's outputs of the run of ``cfg`` valid: also used on a full rehearsal, e.g.
    ``python -c "import tests.pipeline.test_rehearsal as t; t.check_run('configs/voc_rehearsal.yaml')"``."""
    for stage in table.stages_of(cfg):
        assert (run / "stages" / f"{stage}.json").is_file(), f"no marker for {stage}"
    info = read_dataset_json(data)
    assert len(info["classes"]) == cfg.synth.num_classes
    shards = split_shards(data, "train")
    assert len(shards) == math.ceil(cfg.synth.num_train / cfg.data.shard_size) >= 2
    lo, hi = cfg.synth.size_range
    shapes = []
    relations, pseudos = (table.method_stage(cfg, r) for r in (table.RELATIONS, table.PSEUDO))
    for shard in shards:
        outs = [run / d / shard.name for d in ("cams", relations, pseudos)]
        n = 0
        for raw, (cam, rel, pseudo) in iter_joined(shard, *outs):
            s = decode_sample(raw, ["image", "cls"])
            h, w = s["image"].shape[:2]
            shapes.append((h, w))
            assert lo <= max(h, w) <= hi
            c = decode_sample(cam, ["cam"])["cam"]
            assert c.shape == (len(s["cls"]), h, w)
            assert np.isfinite(c).all() and c.min() >= 0 and c.max() <= 1
            if cfg.method == "psa":     # affinity labels on AffinityNet's cell grid
                a = decode_sample(rel, ["aff"])["aff"]
                assert a.shape == cell_grid(h, w, cfg.model.aff_stride)
            else:                       # relation labels at the image's size
                a = decode_sample(rel, ["ir"])["ir"]
                assert a.shape == (h, w)
            assert set(np.unique(a).tolist()) <= {0, 255, *s["cls"]}
            p = decode_sample(pseudo, ["pseudo"])["pseudo"]
            assert p.shape == (h, w) and set(np.unique(p).tolist()) <= {0, *s["cls"]}
            n += 1
        assert n == sum(1 for _ in iter_joined(shard))      # one of each per image
    assert len(shapes) == cfg.synth.num_train and len(set(shapes)) >= min(3, len(shapes))
    for model in ("cls", "aff" if cfg.method == "psa" else "irn", "seg"):
        log = [json.loads(x) for x in (run / model / "log.jsonl").read_text().splitlines()]
        assert log and all(math.isfinite(r["loss"]) for r in log if "loss" in r), model
    rep = json.loads((run / "report.json").read_text())
    for k in ("cam", "rw", "seg"):
        assert 0.0 <= rep["miou"][k] <= 100.0
        assert len(rep["per_class"][k]) == cfg.synth.num_classes + 1
    assert (run / "report.md").read_text().count("|") > 10


def check_run(config: str, *overrides: str) -> None:
    """:func:`_check_outputs` on the run directory of ``config`` (a full rehearsal's)."""
    cfg = load_config(config, list(overrides))
    _check_outputs(cfg, Path(cfg.data.root), Path(cfg.out_dir))
    print(f"{config}: every stage's outputs valid ({cfg.synth.num_train} train images)")
