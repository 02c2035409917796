"""IRN's semantic path as stages (``method: irn``): the table's stages of each method, the
settings that keep AffinityNet's runs cached, the relation labels and the walk per shard, IRN's
boundary branch, and the whole pipeline on Ray with a switch between methods in one run
directory (the classifier and the CAMs kept, the method's own stages and what follows redone)."""
import json

import numpy as np
import pytest
import torch

from psa_dist.cli import main
from psa_dist.config import load_config
from psa_dist.core.boundary import confident_labels
from psa_dist.data.shards import decode_sample, encode_image, encode_json, encode_npy, iter_shard
from psa_dist.data.shards import write_shard
from psa_dist.nets.backbones import build_backbone
from psa_dist.nets.models import BoundaryNet
from psa_dist.stages import table
from psa_dist.stages.label_stages.ir_labels import ir_label_shard
from psa_dist.stages.label_stages.irn_walk import irn_walk_shard


def test_each_method_runs_its_own_stages_after_the_shared_ones():
    psa, irn = load_config(None), load_config(None, ["method=irn"])
    assert table.stages_of(psa) == ["train_cls", "cams", "aff_labels", "train_aff",
                                    "random_walk", "train_seg", "eval", "report"]
    assert table.stages_of(irn) == ["train_cls", "cams", "ir_labels", "train_irn", "irn_walk",
                                    "train_seg", "eval", "report"]
    assert table.needs_of(irn, "train_seg") == ["irn_walk"]
    assert table.labels_of(irn, "seg") == "irn_walk" and table.labels_of(psa, "seg") == "random_walk"
    assert table.shared("cams") and not table.shared("train_seg")
    assert [n for n, _ in table.chain_steps(irn)][2:5] == ["ir-labels", "train-irn", "irn-walk"]
    assert table.exports(irn)["pseudo"] == "irn_walk" and "aff_labels" not in table.exports(irn)
    problems = table.unmet_needs(psa, ["train_irn"], lambda s: True)
    assert any("method irn" in p and "set method=irn" in p for p in problems), problems


def test_the_default_method_keeps_its_settings_and_irn_adds_its_own():
    psa, irn = load_config(None), load_config(None, ["method=irn"])
    for stage in table.stages_of(psa):
        s = table.settings(psa, stage)
        assert "method" not in s and not any(k.startswith(("model.irn_", "ir_labels.",
                                                            "train_irn.", "irn_walk.")) for k in s)
    assert table.settings(irn, "cams") == table.settings(psa, "cams")     # the CAMs serve both
    s = table.settings(irn, "train_seg")
    assert s["method"] == "irn" and "model.irn_radius" in s and "train_irn.lr" in s
    assert not any(k.startswith(("aff_labels.", "train_aff.", "random_walk.")) for k in s)


def _shard_with_cams(tmp_path, h=40, w=48):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    cams = np.zeros((2, h, w), np.float32)
    cams[0, 4:20, 4:24] = 1.0
    cams[1, 22:36, 26:44] = 0.8
    cams[1, 24:30, 30:40] = 1.0
    write_shard(tmp_path / "in.tar", [{"__key__": "a", "jpg": encode_image(image),
                                       "cls.json": encode_json([2, 5])}])
    write_shard(tmp_path / "cams.tar", [{"__key__": "a", "cls.json": encode_json([2, 5]),
                                         "cam.npy": encode_npy(cams.astype(np.float16))}])
    return image, cams


def test_relation_labels_per_shard_are_the_core_functions(tmp_path):
    _, cams = _shard_with_cams(tmp_path)
    res = ir_label_shard(tmp_path / "in.tar", tmp_path / "cams.tar", tmp_path / "ir.tar", 0.3,
                         0.05, crf=None)
    assert res["samples"] == 1 and not res["failed"]
    got = decode_sample(next(iter(iter_shard(tmp_path / "ir.tar"))), ["ir"])["ir"]
    expect = confident_labels(torch.from_numpy(cams.astype(np.float16).astype(np.float32)), [2, 5])
    assert np.array_equal(got, expect.numpy())
    assert set(np.unique(got)) == {0, 2, 5}


def test_the_walk_per_shard_labels_every_pixel_with_the_images_classes(tmp_path):
    image, cams = _shard_with_cams(tmp_path)
    torch.manual_seed(0)
    model = BoundaryNet(build_backbone("small")).eval()
    res = irn_walk_shard(model, tmp_path / "in.tar", tmp_path / "cams.tar", tmp_path / "rw.tar",
                         t=16, tol=1e-5)
    assert res["samples"] == 1
    lab = decode_sample(next(iter(iter_shard(tmp_path / "rw.tar"))), ["pseudo"])["pseudo"]
    assert lab.shape == image.shape[:2] and set(np.unique(lab)) <= {0, 2, 5}
    assert lab[10, 12] == 2 and lab[27, 35] == 5 and lab[38, 2] == 0   # inside each CAM, outside


def test_the_walks_crf_refines_the_normalised_scores_before_the_argmax(tmp_path):
    """irn_walk.crf (this project's addition): the labels are the argmax of the dense CRF on the
    walked scores with the background's, normalised to sum to one; recomputed here from the
    walk without it (the same scores) and the CRF called directly."""
    from psa_dist.core.boundary import boundary_walk
    from psa_dist.core.crf import crf_refine
    from psa_dist.stages.label_stages.irn_walk import boundary_map, walk_image
    image, cams = _shard_with_cams(tmp_path)
    torch.manual_seed(0)
    model = BoundaryNet(build_backbone("small")).eval()
    cams_t = torch.from_numpy(cams.astype(np.float16).astype(np.float32))
    crf = {"iters": 5, "gauss_sxy": 3.0, "gauss_compat": 3.0, "bi_sxy": 30.0, "bi_srgb": 13.0,
           "bi_compat": 10.0}
    got = walk_image(model, image, cams_t, [2, 5], t=16, crf=crf)
    # by hand: the walked maps, the authors' scores, normalised, the CRF, the argmax
    edge = boundary_map(model, image, "cpu")
    small = torch.nn.functional.interpolate(cams_t[None], size=edge.shape, mode="area")[0]
    small = small / (small.amax(dim=(-2, -1), keepdim=True) + 1e-5)
    walked = boundary_walk(small[None], edge[None], 10.0, 16, 5, 0.0)
    up = torch.nn.functional.interpolate(walked, scale_factor=4, mode="bilinear",
                                         align_corners=False)[0, :, :40, :48]
    scores = np.concatenate([np.full((1, 40, 48), 0.25), (up / up.max()).numpy()])
    probs = np.clip(scores / scores.sum(0, keepdims=True), 1e-5, None)
    expect = np.array([0, 2, 5])[crf_refine(image, probs.astype(np.float32), **crf).argmax(0)]
    assert np.array_equal(got.numpy(), expect)
    plain = walk_image(model, image, cams_t, [2, 5], t=16)
    assert np.array_equal(plain.numpy(), np.array([0, 2, 5])[scores.argmax(0)])
    assert not np.array_equal(got.numpy(), plain.numpy())      # the CRF changed something
    cfg = load_config(None, ["method=irn", "irn_walk.crf=true"])
    assert "irn_walk.crf_bi_sxy" in table.settings(cfg, "irn_walk")
    assert ("pydensecrf", "crf", "irn_walk.crf=true") in table.stage("irn_walk").extras(cfg)


def test_the_boundary_branch_trains_its_head_only():
    net = BoundaryNet(build_backbone("small")).train()
    assert not net.backbone.training                      # frozen BN statistics
    x = torch.randn(2, 3, 50, 62)
    out = net(x)
    assert out.shape == (2, 13, 16)                       # ceil(H / 4) x ceil(W / 4)
    out.sum().backward()
    assert all(p.grad is None for p in net.backbone.parameters())
    assert all(p.grad is not None for p in net.head.parameters())


@pytest.mark.slow
@pytest.mark.ray
def test_irn_runs_end_to_end_and_a_run_directory_switches_methods(tmp_path, tiny_config):
    tiny = dict(name="irn", shard_size=10, num_train=20, num_val=6, image_size=64,
                trainers={"train_cls": {"crop_size": 64}, "train_aff": {"crop_size": 64},
                          "train_irn": {"crop_size": 64, "lr": 0.1},
                          "train_seg": {"crop_size": 64}},
                cams={"scales": [1.0, 0.5]}, aff_labels={"crf": False},
                ir_labels={"crf": True}, irn_walk={"t": 8}, random_walk={"t": 8},
                model={"aff_dims": [8, 8, 8, 16], "seg_from_classifier": True},
                ray={"num_cpus": 2}, seg_full=True)
    cfg = tiny_config(tmp_path / "tiny.yaml", tmp_path / "data", **tiny)
    out = tmp_path / "run"
    assert main(["run", str(cfg), f"out_dir={out}"]) == 0                    # psa first
    psa = json.loads((out / "report.json").read_text())
    assert "affinity_labels" in psa
    cams_before = (out / "stages" / "cams.json").read_text()
    assert main(["run", str(cfg), f"out_dir={out}", "method=irn"]) == 0      # then IRN
    rep = json.loads((out / "report.json").read_text())
    assert "relation_labels" in rep and "affinity_labels" not in rep
    assert (out / "stages" / "cams.json").read_text() == cams_before        # CAMs kept
    assert set(rep["stage_seconds"]) >= {"ir_labels", "train_irn", "irn_walk", "train_seg"}
    assert len(list((out / "irn_walk").glob("*.tar"))) == 2
    # the report shows both methods on the same CAMs: psa's figures as its own report had them
    assert rep["method"] == "irn" and set(rep["methods"]) == {"psa", "irn"}
    assert rep["methods"]["psa"] == psa["methods"]["psa"]
    assert rep["methods"]["psa"]["walk"] == psa["miou"]["rw"]
    assert rep["methods"]["irn"]["walk"] == rep["miou"]["rw"]
    assert rep["methods"]["irn"]["labels"] == "relation_labels"
    md = (out / "report.md").read_text()
    assert "## The methods run on these CAMs" in md and "| IRN (irn) |" in md
    assert "| AffinityNet (psa) |" in md
    assert json.loads((out / "stages" / "train_seg.json").read_text())["settings"]["method"] == "irn"
    for k in ("cam", "rw", "seg", "seg_full"):
        assert 0.0 <= rep["miou"][k] <= 100.0
    # the walk's network and the relation labels' figure, from the IRN run
    ev = json.loads((out / "stages" / "eval.json").read_text())
    assert 0 < ev["aff_labels"]["coverage"] <= 1
    assert main(["export", str(cfg), f"out_dir={out}", "method=irn", "--what", "ir_labels",
                 "--out", str(tmp_path / "ir"), "--workers", "1"]) == 0
    assert len(list((tmp_path / "ir" / "SegmentationClassAug").glob("*.png"))) == 20


@pytest.mark.parametrize("name", ["voc_irn", "coco_irn"])
def test_the_irn_paper_configs_have_the_authors_settings_and_chain_irns_stages(name, tmp_path,
                                                                              capsys):
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml"
    cfg = load_config(path)
    assert cfg.method == "irn" and cfg.model.irn_backbone == "pretrained"
    assert cfg.model.backbone == "resnet50" and cfg.model.irn_radius == 10
    cls_ranks = cfg.train_cls.nodes * cfg.train_cls.gpus_per_node
    assert cls_ranks * cfg.train_cls.batch_size == 16 and cfg.train_cls.crop_size == 512
    assert (cfg.train_cls.epochs, cfg.train_cls.lr, cfg.train_cls.weight_decay) == (5, 0.1, 1e-4)
    assert (cfg.train_irn.epochs, cfg.train_irn.lr, cfg.train_irn.weight_decay) == (3, 0.1, 1e-4)
    assert cfg.ir_labels.crf and cfg.cams.scales == (1.0, 0.5, 1.5, 2.0) and cfg.cams.flip
    assert (cfg.ir_labels.fg_thres, cfg.ir_labels.bg_thres) == (0.30, 0.05)
    assert (cfg.irn_walk.beta, cfg.irn_walk.t, cfg.irn_walk.radius, cfg.irn_walk.bg_score) == \
        (10.0, 256, 5, 0.25)
    ranks = cfg.train_irn.nodes * cfg.train_irn.gpus_per_node
    assert ranks * cfg.train_irn.batch_size == 32 and cfg.train_irn.crop_size == 512
    assert main(["submit", str(path), "--dry-run", f"out_dir={tmp_path}"]) == 0
    jobs = [line.split()[1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("[submit] ") and "(" in line]
    assert jobs == ["train-cls", "cams", "ir-labels", "train-irn", "irn-walk", "train-seg",
                    "eval-report"]


def test_a_stage_done_by_the_other_method_is_not_done_for_this_one(tmp_path):
    from psa_dist.pipeline import run_pipeline
    from psa_dist.stages.run_dir import RunDir
    from psa_dist.submit import _finished
    psa = load_config(None, [f"out_dir={tmp_path}"])
    irn = load_config(None, [f"out_dir={tmp_path}", "method=irn"])
    run = RunDir(tmp_path)
    run.stages.mkdir(parents=True)
    for stage in ("train_cls", "cams", "train_seg"):           # as a psa run leaves them
        run.marker(stage).write_text(json.dumps({"settings": table.settings(psa, stage)}))
    assert run.done_for("cams", "irn") and run.done_for("train_seg", "psa")
    assert not run.done_for("train_seg", "irn")               # psa's segmenter: not irn's
    assert set(_finished(irn, table.stages_of(irn))) == {"train_cls", "cams"}     # submit's view
    assert set(_finished(psa, table.stages_of(psa))) == {"train_cls", "cams", "train_seg"}
    with pytest.raises(Exception, match="not a stage of method=irn"):
        run_pipeline(irn, redo_from="aff_labels")


def test_keys_added_later_are_recorded_only_off_their_default():
    """A marker written before a key existed still matches while the key keeps the value every
    run had before it: the trainers' optimizer and warm-up, irn_walk's CRF (and its kernels)."""
    irn = load_config(None, ["method=irn"])
    for stage in ("train_cls", "train_seg", "irn_walk"):
        s = table.settings(irn, stage)
        assert not any(k.endswith((".optimizer", ".warmup_epochs")) for k in s)
        assert not any(k.startswith("irn_walk.crf") for k in s)
    changed = load_config(None, ["method=irn", "train_cls.optimizer=adamw",
                                 "train_cls.warmup_epochs=1", "irn_walk.crf=true"])
    s = table.settings(changed, "irn_walk")
    assert s["train_cls.optimizer"] == "adamw" and s["train_cls.warmup_epochs"] == 1
    assert s["irn_walk.crf"] is True and "irn_walk.crf_bi_sxy" in s
    # a marker written while irn_walk's CRF keys were recorded with the CRF off still matches
    old_rule = {**table.settings(irn, "irn_walk"), "irn_walk.crf": False,
                **{f"irn_walk.crf_{k}": 1.0 for k in ("iters", "bi_sxy")},
                "train_seg.optimizer": "sgd", "train_seg.warmup_epochs": 0.0}
    assert table.changed_settings(old_rule, table.settings(irn, "irn_walk")) == []
    assert table.changed_settings(table.settings(irn, "irn_walk"), s) == [
        "irn_walk.crf", *sorted(f"irn_walk.crf_{k}" for k in
                                ("bi_compat", "bi_srgb", "bi_sxy", "gauss_compat",
                                 "gauss_sxy", "iters")),
        "train_cls.optimizer", "train_cls.warmup_epochs"]
