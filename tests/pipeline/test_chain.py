"""`psa-dist submit` without a cluster: the chain covers every stage in order, each job asks for
its section's shape, and --dry-run prints the sbatch parameters. (The chain on a real SLURM
cluster: tests/pipeline/test_slurm_chain.py.)"""
import sys
from pathlib import Path

import pytest

from psa_dist.cli import main
from psa_dist.cluster.slurm_chain import sbatch_lines
from psa_dist.config import load_config
from psa_dist.pipeline import ChainUnmet
from psa_dist.stages.table import chain_steps, stages_of
from psa_dist.submit import job_shape, submit_chain

REPO = Path(__file__).resolve().parents[2]


def test_chain_is_the_pipeline_in_order():
    for cfg in (load_config(None), load_config(None, ["method=irn"])):
        assert [s for _, stages in chain_steps(cfg) for s in stages] == stages_of(cfg)
    assert [name for name, _ in chain_steps(load_config(None))] == [
        "train-cls", "cams", "aff-labels", "train-aff", "random-walk", "train-seg", "eval-report"]


def test_each_job_takes_its_sections_shape():
    cfg = load_config(None, ["train_cls.nodes=2", "train_cls.gpus_per_node=4", "ray.nodes=3",
                             "train_seg.gpus_per_node=8", "train_seg.partition=big"])
    shapes = {name: job_shape(cfg, stages) for name, stages in chain_steps(cfg)}
    assert (shapes["train-cls"].nodes, shapes["train-cls"].gpus_per_node) == (2, 4)
    assert shapes["cams"].nodes == shapes["random-walk"].nodes == 3
    ev = shapes["eval-report"]
    assert (ev.nodes, ev.tasks_per_node, ev.gpus_per_node, ev.partition) == (1, 1, 1, "big")
    cfg.ray.enabled = False      # a label stage without Ray: one task
    assert job_shape(cfg, ["cams"]).nodes == 1


def test_sbatch_lines():
    lines = sbatch_lines({"name": "j", "timeout_min": 30, "tasks_per_node": 4, "mem_gb": 64,
                          "slurm_partition": "gpu", "slurm_dependency": "afterok:7",
                          "slurm_additional_parameters": {"kill_on_invalid_dep": "yes",
                                                          "exclusive": True}})
    assert lines == ["#SBATCH --job-name=j", "#SBATCH --time=30", "#SBATCH --ntasks-per-node=4",
                     "#SBATCH --mem=64GB", "#SBATCH --partition=gpu",
                     "#SBATCH --dependency=afterok:7", "#SBATCH --kill-on-invalid-dep=yes",
                     "#SBATCH --exclusive"]


def test_dry_run_prints_every_job_and_submits_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["submit", str(REPO / "configs" / "voc_resnet38.yaml"), "--dry-run", f"out_dir={out}",
               "train_cls.partition=gpu", "train_cls.sbatch_extra=[--mail-type=END]"])
    text = capsys.readouterr().out
    assert rc == 0 and not out.exists()
    assert text.count("#SBATCH --job-name=psa-voc_resnet38-") == 7
    assert "#SBATCH --dependency=afterok:<train-seg>" in text
    assert "#SBATCH --partition=gpu" in text and "#SBATCH --mail-type=END" in text
    assert text.count("#SBATCH --kill-on-invalid-dep=yes") == 7


def test_dry_run_leaves_out_finished_stages(tmp_path):
    out = tmp_path / "run"
    (out / "stages").mkdir(parents=True)
    for s in ("train_cls", "cams"):
        (out / "stages" / f"{s}.json").write_text("{}")
    rows = submit_chain(load_config(None, [f"out_dir={out}"]), dry_run=True)
    assert [r["step"] for r in rows] == ["aff-labels", "train-aff", "random-walk", "train-seg",
                                         "eval-report"]
    assert not any("dependency" in line for line in rows[0]["sbatch"])


def test_submit_starts_at_the_first_step_not_done(tmp_path):
    out = tmp_path / "run"
    (out / "stages").mkdir(parents=True)
    (out / "stages" / "train_cls.json").write_text("{}")
    (out / "stages" / "cams.json").write_text("{}")
    (out / "stages" / "aff_labels.json").write_text("{}")
    cfg = load_config(None, [f"out_dir={out}"])
    assert [r["step"] for r in submit_chain(cfg, dry_run=True)][0] == "train-aff"
    (out / "stages" / "cams.json").unlink()      # cams redone: fine, it is part of the chain
    assert [r["step"] for r in submit_chain(cfg, dry_run=True)][0] == "cams"


def test_submit_refuses_a_chain_whose_crf_is_not_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)     # as if psa-dist[crf] were absent
    cfg = load_config(None, [f"out_dir={tmp_path}", "random_walk.crf=true"])
    with pytest.raises(ChainUnmet, match=r"random_walk.crf=true needs the pydensecrf module.*"
                                         r"psa-dist\[crf\]"):
        submit_chain(cfg, dry_run=True)
