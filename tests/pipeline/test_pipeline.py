"""The whole pipeline on a tiny config: end to end, a valid report, caching and resume."""
import json
import sys

import pytest

from psa_dist.cli import main
from psa_dist.config import load_config
from psa_dist.data.shards import iter_shard, read_dataset_json
from psa_dist.pipeline import ChainUnmet, run_pipeline
from psa_dist.stages import table
from psa_dist.stages.run_dir import Run

STAGES = table.stages_of(load_config(None))     # the default method's (AffinityNet's)

def tiny(crf: bool) -> dict:
    """The tiny config of the pipeline runs (``tiny_config``), the CRF on or off."""
    crop = {"crop_size": 64, "resize_long": [56, 72]}
    return dict(name="tiny", shard_size=10, image_size=64, num_train=20, num_val=6,
                trainers={"train_cls": {**crop, "log_every": 2}, "train_aff": crop,
                          "train_seg": crop},
                cams={"scales": [1.0, 0.5]}, aff_labels={"crf": crf},
                random_walk={"t": 8, "crf": crf},
                model={"aff_dims": [8, 8, 8, 16], "seg_from_classifier": True}, seg_full=True)


@pytest.fixture
def tiny_cfg(tmp_path, tiny_config):
    return tiny_config(tmp_path / "tiny.yaml", tmp_path / "data", **tiny(crf=True))


@pytest.mark.slow
def test_pipeline_end_to_end_and_cached(tiny_cfg, tmp_path, capsys):
    out = tmp_path / "run"
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)    # an inline trainer sets its own (2 here: 2 CPUs, no workers)...
    try:
        assert main(["run", str(tiny_cfg), f"out_dir={out}"]) == 0
        assert torch.get_num_threads() == 1     # ...and hands the process's back
    finally:
        torch.set_num_threads(threads)
    rep = json.loads((out / "report.json").read_text())
    info = read_dataset_json(tmp_path / "data")
    for k in ("cam", "rw", "seg", "seg_full"):
        assert 0.0 <= rep["miou"][k] <= 100.0
        assert len(rep["per_class"][k]) == info["num_classes"] + 1
    assert rep["classes"] == ["background"] + info["classes"]
    assert set(rep["stage_seconds"]) >= {"train_cls", "cams", "aff_labels", "train_aff",
                                         "random_walk", "train_seg", "eval"}
    assert len(rep["panels"]) == 4 and all((out / p).is_file() for p in rep["panels"])
    for kind in ("cls", "aff", "seg", "seg_full"):     # the last epoch's line of each trainer's log
        last = [json.loads(x) for x in (out / kind / "log.jsonl").read_text().splitlines()][-1]
        assert rep["final_loss"][kind] == round(last["loss"], 4) and "epoch_seconds" in last
    md = (out / "report.md").read_text()
    assert "| CAM (train) |" in md and "![panels/" in md
    # every label stage wrote one shard per train shard with all keys, in order
    keys = [r["__key__"] for r in iter_shard(tmp_path / "data" / "train-000000.tar")]
    for d, field in (("cams", "cam.npy"), ("aff_labels", "aff.png"), ("random_walk", "pseudo.png")):
        got = list(iter_shard(out / d / "train-000000.tar"))
        assert [g["__key__"] for g in got] == keys and all(field in g for g in got)
    ri = json.loads((out / "run_info.json").read_text())
    assert ri["config"]["out_dir"] == str(out) and "torch" in ri["versions"]
    # a rerun does nothing
    capsys.readouterr()
    assert main(["run", str(tiny_cfg), f"out_dir={out}"]) == 0
    text = capsys.readouterr().out
    assert all(f"{s}: done (cached" in text for s in STAGES)
    assert 0 <= rep["perfect_walk"]["miou"] <= 100 and "perfect affinity" in md
    # a stage redone after eval (train-seg here) makes eval and report stale: they run again
    seg_mtime = (out / "stages" / "eval.json").stat().st_mtime_ns
    ck_mtime = (out / "seg" / "checkpoint.pth").stat().st_mtime_ns
    log_lines = len((out / "seg" / "log.jsonl").read_text().splitlines())
    capsys.readouterr()
    assert main(["train-seg", str(tiny_cfg), f"out_dir={out}", "--force"]) == 0
    # --force trains anew: it does not resume the finished checkpoint, nor append to the log
    assert "train_seg: redone from scratch (removed seg/checkpoint.pth" in capsys.readouterr().out
    assert (out / "seg" / "checkpoint.pth").stat().st_mtime_ns > ck_mtime
    assert len((out / "seg" / "log.jsonl").read_text().splitlines()) == log_lines
    assert not (out / "stages" / "eval.json").exists() and not (out / "stages" / "report.json").exists()
    capsys.readouterr()
    assert main(["run", str(tiny_cfg), f"out_dir={out}"]) == 0
    text = capsys.readouterr().out
    assert "eval: done (cached" not in text and "report: done (cached" not in text
    assert (out / "stages" / "eval.json").stat().st_mtime_ns > seg_mtime
    # other settings than the cached stages were made with: each is named with the keys, kept,
    # and `run --from` redoes the first one and everything after it
    capsys.readouterr()
    assert main(["run", str(tiny_cfg), f"out_dir={out}", "cams.scales=[1.0]"]) == 0
    text = capsys.readouterr().out
    assert "warning: cams is cached from a run with other settings (cams.scales)" in text
    assert "warning: train_seg is cached" in text and "train_cls is cached" not in text
    assert "psa-dist run CONFIG --from cams" in text
    cls_mtime = (out / "cls" / "checkpoint.pth").stat().st_mtime_ns
    assert main(["run", str(tiny_cfg), f"out_dir={out}", "cams.scales=[1.0]", "--from", "cams"]) == 0
    text = capsys.readouterr().out
    assert "train_cls: done (cached" in text and "cams: redone from scratch" in text
    assert (out / "cls" / "checkpoint.pth").stat().st_mtime_ns == cls_mtime
    assert json.loads((out / "stages" / "cams.json").read_text())["settings"]["cams.scales"] == [1.0]
    assert main(["run", str(tiny_cfg), f"out_dir={out}", "cams.scales=[1.0]"]) == 0
    assert "warning" not in capsys.readouterr().out


@pytest.mark.slow
def test_resume_after_interrupted_stage(tmp_path, tiny_config):
    p = tiny_config(tmp_path / "tiny.yaml", tmp_path / "data", **tiny(crf=False))
    out = tmp_path / "run"
    cfg = load_config(p, [f"out_dir={out}"])
    run_pipeline(cfg, stages=["train_cls", "cams"])
    # simulate a crash in the middle of the aff_labels stage: one shard written, no marker
    run_pipeline(cfg, stages=["aff_labels"])
    (out / "stages" / "aff_labels.json").unlink()
    second = out / "aff_labels" / "train-000001.tar"
    second.unlink()
    first_mtime = (out / "aff_labels" / "train-000000.tar").stat().st_mtime_ns
    cls_mtime = (out / "cls" / "checkpoint.pth").stat().st_mtime_ns
    run_pipeline(cfg)
    assert (out / "report.json").is_file()
    assert (out / "aff_labels" / "train-000000.tar").stat().st_mtime_ns == first_mtime  # kept
    assert second.is_file()                                                            # redone
    assert (out / "cls" / "checkpoint.pth").stat().st_mtime_ns == cls_mtime            # not retrained


def test_stage_subcommands_have_help(capsys):
    for cmd in ("run", "train-cls", "cams", "aff-labels", "train-aff", "random-walk", "train-seg",
                "eval", "data"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_paper_configs_validate():
    import pathlib
    for name in ("voc_resnet38.yaml", "voc_resnet50.yaml", "coco_resnet50.yaml", "demo.yaml"):
        cfg = load_config(pathlib.Path(__file__).parents[2] / "configs" / name)
        assert cfg.random_walk.beta == 8.0
        if name != "demo.yaml":
            assert cfg.aff_labels.crf and cfg.cams.scales == (1.0, 0.5, 1.5, 2.0)
            assert cfg.random_walk.t == 256
        else:   # the walk's reach (radius x sqrt(t) cells) in sides of the demo's 32-cell grid is
            # the authors' on VOC's stride-8 grid (47-63 cells at t 256: 1.3-1.7 sides)
            reach = cfg.random_walk.radius * cfg.random_walk.t ** 0.5 / (
                cfg.synth.image_size / cfg.model.aff_stride)
            assert 1.2 <= reach <= 1.7, reach


def test_synth_data_follows_its_settings_and_stale_runs_are_refused(tiny_cfg, tmp_path, capsys):
    out = tmp_path / "run"
    run = Run(load_config(tiny_cfg, [f"out_dir={out}"]))
    run.check_same_dataset(force=False)
    run.check_same_dataset(force=False)           # same data: fine
    # other generator settings: the generated dataset is made anew, not reused
    run2 = Run(load_config(tiny_cfg, [f"out_dir={out}", "synth.body_pattern=0.2"]))
    assert "generating it anew" in capsys.readouterr().out
    assert read_dataset_json(tmp_path / "data")["source"]["synth"]["body_pattern"] == 0.2
    # ... and the run directory made from the old data is not silently reused
    with pytest.raises(FileExistsError, match="another dataset"):
        run2.check_same_dataset(force=False)
    run2.check_same_dataset(force=True)
    run2.check_same_dataset(force=False)


def test_segmenter_can_start_from_the_trained_classifier(tiny_cfg, tmp_path):
    import torch
    from psa_dist.nets.models import build_classifier
    from psa_dist.stages.model_factory import model_to_train as build_model
    out = tmp_path / "run"
    run = Run(load_config(tiny_cfg, [f"out_dir={out}", "model.seg_from_classifier=true"]))
    with pytest.raises(FileNotFoundError, match="cls/checkpoint.pth not found: run `psa-dist "
                                                "train-cls CONFIG` first"):
        build_model(run, "seg")                    # no classifier yet: a clear error
    torch.manual_seed(1)
    cls = build_classifier(run.cfg.model, run.num_classes)
    (out / "cls").mkdir(parents=True)
    torch.save({"model": cls.state_dict()}, out / "cls" / "checkpoint.pth")
    for kind in ("seg", "seg_full"):
        seg = build_model(run, kind)
        for k, v in cls.backbone.state_dict().items():
            assert torch.equal(seg.backbone.state_dict()[k], v), k
    plain = build_model(Run(load_config(tiny_cfg, [f"out_dir={out}",
                                                    "model.seg_from_classifier=false"])), "seg")
    assert not torch.equal(plain.backbone.stem[0].weight, cls.backbone.stem[0].weight)
    with pytest.raises(Exception, match="seg_from_classifier"):
        load_config(tiny_cfg, ["model.seg_from_classifier=true", "model.segmenter=deeplabv3_resnet50"])


def test_final_losses_read_the_last_epoch_and_pass_over_a_cut_line(tmp_path):
    from psa_dist.stages.report import final_losses
    (tmp_path / "cls").mkdir()
    lines = [{"kind": "cls", "epoch": 0, "step": 5, "of": 10, "loss": 0.9},
             {"kind": "cls", "epoch": 0, "step": 5, "loss": 0.8, "epoch_seconds": 1.0},
             {"kind": "cls", "epoch": 1, "step": 10, "loss": 0.61234, "epoch_seconds": 1.0}]
    text = "\n".join(json.dumps(r) for r in lines[:2]) + '\n{"kind": "cls", "ep\n'  # killed mid-line
    (tmp_path / "cls" / "log.jsonl").write_text(text + json.dumps(lines[2]) + "\n")
    assert final_losses(tmp_path) == {"cls": 0.6123}


def test_chain_is_checked_before_the_first_stage(tiny_cfg, tmp_path, monkeypatch):
    """A stage whose earlier stages are not done, or whose settings need a package that is not
    installed, stops the run before anything trains (not a quarter of an hour later)."""
    out = tmp_path / "run"
    cfg = load_config(tiny_cfg, [f"out_dir={out}"])
    with pytest.raises(ChainUnmet, match="cams needs the outputs of train_cls.*psa-dist train-cls"):
        run_pipeline(cfg, stages=["cams"])
    monkeypatch.setitem(sys.modules, "pydensecrf", None)     # as without psa-dist[crf]
    with pytest.raises(ChainUnmet) as e:
        run_pipeline(cfg)
    assert "aff_labels: aff_labels.crf=true needs the pydensecrf module" in str(e.value)
    assert "random_walk: random_walk.crf=true" in str(e.value)
    assert "pip install 'psa-dist[crf]'" in str(e.value)
    assert not (out / "cls").exists() and not (out / "stages" / "train_cls.json").exists()
    assert main(["run", str(tiny_cfg), f"out_dir={out}"]) == 2     # the CLI: an error, no trace


def test_a_run_directory_from_before_the_rename_keeps_its_walk(tiny_cfg, tmp_path):
    out = tmp_path / "run"
    (out / "rw").mkdir(parents=True)
    (out / "rw" / "train-000000.tar").write_bytes(b"x")
    run = Run(load_config(tiny_cfg, [f"out_dir={out}"]))
    assert run.stage_dir("random_walk") == out / "random_walk"
    assert (out / "random_walk" / "train-000000.tar").read_bytes() == b"x" and not (out / "rw").exists()


@pytest.mark.slow
def test_tensorboard_gets_the_json_logs_scalars_and_panels(tiny_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    cfg = load_config(tiny_cfg, [f"out_dir={out}", "train_cls.tensorboard=true", "train_cls.epochs=2",
                                 "ray.enabled=false"])
    run_pipeline(cfg, stages=["train_cls"])
    acc = EventAccumulator(str(out / "cls" / "tensorboard"), size_guidance={"images": 0}).Reload()
    lines = [json.loads(x) for x in (out / "cls" / "log.jsonl").read_text().splitlines()]
    step_lines = [r for r in lines if "epoch_seconds" not in r]
    loss = acc.Scalars("cls/loss")
    assert [e.step for e in loss] == [r["step"] for r in step_lines]
    assert all(abs(e.value - r["loss"]) < 1e-6 for e, r in zip(loss, step_lines))
    assert len(acc.Scalars("cls/epoch_loss")) == 2 and len(acc.Scalars("cls/lr")) == len(lines)
    panels = acc.Images("cls/panels")
    # one grid of 4 rows side by side, each row image | CAM heat (64 px crops)
    assert [p.step for p in panels] == [1, 2] and (panels[0].width, panels[0].height) == (4 * 2 * 64, 64)
    assert not (out / "aff" / "tensorboard").exists()     # only where switched on
