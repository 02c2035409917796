"""The job-shape warnings (``stages/job_shape.py``): the shipped paper configs ask for a shape that fits
their work, a Ray label stage or a trainer of a GPU-sized model without a GPU and loader workers
that outnumber a trainer's CPUs are each said on stderr, naming the stage and the keys, before
``psa-dist submit`` / ``psa-dist run`` submit or run anything; the CPU demo gets none."""
from pathlib import Path

import pytest

from psa_dist.cli import main
from psa_dist.config import load_config
from psa_dist.pipeline import ChainUnmet, run_pipeline
from psa_dist.stages import table
from psa_dist.stages.job_shape import shape_warnings

STAGES = table.stages_of(load_config(None))     # the default method's (AffinityNet's)

REPO = Path(__file__).resolve().parents[2]
PAPER = ["voc_resnet38", "voc_resnet50", "coco_resnet50", "voc_irn", "coco_irn"]


def _config(name, overrides=()):
    return load_config(REPO / "configs" / f"{name}.yaml", list(overrides))


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_ship_a_shape_that_fits(name):
    cfg = _config(name)
    stages = table.stages_of(cfg)               # the config's method's
    assert shape_warnings(cfg, stages, submit=True) == []
    assert shape_warnings(cfg, stages) == []
    trainers = [s for s in stages if s.startswith("train_")]
    assert len(trainers) == 3
    for section in trainers:                    # what the check stands for
        job = getattr(cfg, section)
        assert job.launcher == "slurm" and job.gpus_per_node > 0
        assert job.cpus_per_task >= job.num_workers + 1
    assert cfg.ray.launcher == "slurm" and cfg.ray.gpus_per_node > 0


@pytest.mark.parametrize("submit", [True, False])
def test_ray_stages_without_a_gpu_are_named(submit):
    lines = shape_warnings(_config("voc_resnet38", ["ray.gpus_per_node=0"]), STAGES, submit)
    assert [line.split(" ", 1)[0] for line in lines] == ["cams", "random_walk"]   # not aff_labels
    assert "the classifier on model.backbone=resnet38" in lines[0]
    assert "the AffinityNet on model.backbone=resnet38" in lines[1]
    assert all("ray.gpus_per_node=0" in line and "device=auto" in line and
               "one Ray actor per CPU" in line for line in lines)


def test_trainer_without_a_gpu_is_named_where_its_job_is_a_slurm_job():
    over = ["train_seg.gpus_per_node=0"]
    lines = shape_warnings(_config("voc_resnet38", over), STAGES)
    assert len(lines) == 1 and lines[0].startswith("train_seg computes with "
                                                   "model.segmenter=deeplabv3_resnet50")
    assert "train_seg.gpus_per_node=0 (train_seg.launcher=slurm" in lines[0]
    inline = _config("voc_resnet38", over + ["train_seg.launcher=inline"])
    assert shape_warnings(inline, STAGES) == []                  # this machine's device
    assert len(shape_warnings(inline, STAGES, submit=True)) == 1  # submit: a SLURM job anyway
    assert shape_warnings(_config("voc_resnet38", over + ["device=cpu"]), STAGES) == []


def test_loader_workers_that_outnumber_the_cpus_are_named():
    cfg = _config("coco_resnet50", ["train_aff.num_workers=8", "train_aff.cpus_per_task=4"])
    lines = shape_warnings(cfg, STAGES, submit=True)
    assert len(lines) == 1 and lines[0].startswith("train_aff: ")
    assert "train_aff.num_workers=8" in lines[0] and "train_aff.cpus_per_task=4" in lines[0]
    assert "at least 9" in lines[0]
    equal = _config("coco_resnet50", ["train_aff.num_workers=8", "train_aff.cpus_per_task=8"])
    assert len(shape_warnings(equal, STAGES)) == 1               # equal: none left for the rank
    # only the stages asked for are checked
    assert shape_warnings(cfg, ["train_cls", "cams"], submit=True) == []


def test_demo_config_gets_no_warning():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert (cfg.model.backbone, cfg.train_cls.launcher) == ("small", "local")
    assert shape_warnings(cfg, STAGES) == []
    assert shape_warnings(cfg, STAGES, submit=True) == []
    # a small backbone needs no GPU, on SLURM too
    cpu_jobs = [f"{s}.gpus_per_node=0" for s in ("train_cls", "train_aff", "train_seg", "ray")]
    assert shape_warnings(load_config(REPO / "configs" / "demo.yaml", cpu_jobs), STAGES, True) == []


def test_submit_warns_on_stderr_and_still_submits(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["submit", str(REPO / "configs" / "voc_resnet38.yaml"), "--dry-run",
               f"out_dir={out}", "ray.gpus_per_node=0"])
    captured = capsys.readouterr()
    assert rc == 0 and captured.out.count("#SBATCH --job-name=") == 7     # a warning, not an error
    warned = [line for line in captured.err.splitlines() if line.startswith("psa-dist: warning: ")]
    assert [w.split()[2] for w in warned] == ["cams", "random_walk"]
    assert "warning" not in captured.out
    rc = main(["submit", str(REPO / "configs" / "voc_resnet38.yaml"), "--dry-run",
               f"out_dir={out}"])
    assert rc == 0 and "warning" not in capsys.readouterr().err


def test_run_warns_before_anything_runs(tmp_path, capsys):
    # a tiny synthetic run asking for train_aff alone: the shape warning comes, then the chain
    # check stops it (train_cls and aff_labels not done), so nothing has been submitted or run
    cfg = load_config(None, [f"out_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'synth'}",
                             "synth.num_train=4", "synth.num_val=2", "synth.image_size=32",
                             "data.shard_size=4", "train_aff.launcher=slurm",
                             "train_aff.num_workers=2", "train_aff.cpus_per_task=2"])
    with pytest.raises(ChainUnmet, match="train_aff needs the outputs of train_cls"):
        run_pipeline(cfg, stages=["train_aff"])
    err = capsys.readouterr().err
    assert "psa-dist: warning: train_aff: train_aff.num_workers=2 loader workers" in err
    assert "(train_aff.launcher=slurm)" in err
    assert not (tmp_path / "run" / "stages" / "submitit").exists()


def _dataset(root, counts):
    """A dataset.json listing COCO's train split in shards of ``counts`` samples (the warnings
    read no shard)."""
    import json
    root.mkdir(parents=True, exist_ok=True)
    shards = [{"name": f"train-{i:06d}.tar", "count": c} for i, c in enumerate(counts)]
    (root / "dataset.json").write_text(json.dumps({"splits": {"train2014": {"shards": shards}}}))
    return root


COCO_SHARDS = [500] * 165 + [283]      # COCO 2014 train (82,081 images) at --shard-size 500
COCO_SHARDS_100 = [100] * 820 + [81]   # the same at the guide's --shard-size 100


@pytest.mark.parametrize("nodes,warned", [(2, False), (8, False), (32, True)])
def test_coco_shares_at_8_32_and_128_gpus(tmp_path, nodes, warned):
    """COCO's 166 shards with 6 loader workers a rank: 8 and 32 GPUs (48 and 192 streams) read
    each shard at most twice and are not warned; 128 GPUs (768 streams, each shard split 5 ways)
    are told the shard size that reads each shard once."""
    root = _dataset(tmp_path / "coco", COCO_SHARDS)
    over = [f"data.root={root}"] + [f"{s}.nodes={nodes}" for s in ("train_cls", "train_aff",
                                                                    "train_seg")]
    lines = shape_warnings(_config("coco_resnet50", over), STAGES, submit=True)
    if not warned:
        assert lines == []
        return
    assert [line.split(":", 1)[0] for line in lines] == ["train_cls", "train_aff", "train_seg"]
    assert all("768 loader streams on 166 shards" in line and "up to 5 streams" in line and
               "shards of at most 107 samples (--shard-size)" in line for line in lines), lines


@pytest.mark.parametrize("nodes", [2, 8, 32])
def test_coco_at_the_guides_shard_size_is_not_warned_up_to_128_gpus(tmp_path, nodes):
    root = _dataset(tmp_path / "coco", COCO_SHARDS_100)
    over = [f"data.root={root}"] + [f"{s}.nodes={nodes}" for s in ("train_cls", "train_aff",
                                                                    "train_seg")]
    assert shape_warnings(_config("coco_resnet50", over), STAGES, submit=True) == []


def test_a_step_larger_than_the_set_and_a_large_left_over_are_named(tmp_path):
    root = _dataset(tmp_path / "small", [50, 50])
    lines = shape_warnings(_config("coco_resnet50", [f"data.root={root}", "train_cls.nodes=16"]),
                           ["train_cls"], submit=True)
    assert len(lines) == 2 and "64 rank(s) x train_cls.batch_size=2 take 128 samples a step, " \
        "but its training set holds 100" in lines[0]
    root = _dataset(tmp_path / "mid", [500, 500])
    lines = shape_warnings(_config("coco_resnet50", [f"data.root={root}", "train_cls.nodes=4",
                                                     "train_cls.batch_size=16"]),
                           ["train_cls"], submit=True)
    # 16 ranks x 16 = 256 a step: 3 steps train 768 of 1000
    assert len(lines) == 2 and "trains 768 of 1000 samples; 232 (23%) wait" in lines[0], lines
    assert "96 loader streams on 2 shards" in lines[1]
