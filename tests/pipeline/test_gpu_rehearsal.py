"""The rehearsal configs (configs/voc_rehearsal.yaml, configs/coco_rehearsal.yaml) on CUDA, cut
to 4 train and 2 val images, one epoch per trainer, through ``run_pipeline``: every stage's
marker, each trainer's rank and precision lines saying cuda, the model stages on one GPU actor.
The tests are marked ``gpu`` and skip only where CUDA is absent (``gpu_common``); the helpers
also run on the CPU, unmarked, so that their code runs in every test run.
"""
import json
import math
from pathlib import Path

import pytest
import torch

from psa_dist.config import load_config
from psa_dist.pipeline import run_pipeline
from psa_dist.stages import table
from tests.gpu_common import CUDA, needs_cuda

REPO = Path(__file__).resolve().parents[2]

REHEARSALS = ["voc_rehearsal", "coco_rehearsal"]


def rehearsal_overrides(tmp: Path, device: str = CUDA) -> list[str]:
    """The rehearsal config cut to 4 train / 2 val images, one epoch per trainer, inline
    trainers, on ``device``; everything else (backbone, sizes, crops, scales, CRF) as written."""
    over = [f"out_dir={tmp / 'run'}", f"data.root={tmp / 'data'}", f"device={device}",
            "synth.num_train=4", "synth.num_val=2", "data.shard_size=2", "data.workers=2",
            "ray.enabled=true", "ray.num_actors=0"]
    for t in ("train_cls", "train_aff", "train_seg"):
        over += [f"{t}.epochs=1", f"{t}.batch_size=2", f"{t}.num_workers=1",
                 f"{t}.launcher=inline", f"{t}.stop_patience=null", f"{t}.log_every=1"]
    return over


def run_rehearsal(name: str, tmp: Path, local_ray, device: str = CUDA):
    """The cut rehearsal config ``name`` through ``run_pipeline`` on a Ray instance with the
    device's GPUs (``local_ray``, the fixture); returns its config and run directory."""
    path = REPO / "configs" / f"{name}.yaml"
    if not path.is_file():
        pytest.fail(f"{path.relative_to(REPO)} does not exist: the rehearsal config (issue #17: "
                    f"real sizes, synthetic data, random init) must be written before this test "
                    f"can check it on the GPU")
    cfg = load_config(path, rehearsal_overrides(tmp, device))
    assert cfg.data.source == "synth", f"{path.name}: a rehearsal runs on synthetic data"
    with local_ray(num_cpus=4, num_gpus=1 if device.startswith("cuda") else 0):
        assert run_pipeline(cfg) == 0
    return cfg, tmp / "run"


def check_rehearsal(cfg, run: Path, out: str, device: str = CUDA) -> dict:
    """Every stage's marker is there; each trainer said it ran on ``device`` (its rank line and
    its precision line) and logged finite losses; each label stage wrote both shards, none failed;
    the model stages ran on one actor per GPU."""
    kind = torch.device(device).type
    for stage in table.stages_of(cfg):
        assert (run / "stages" / f"{stage}.json").is_file(), f"{cfg.name}: no marker for {stage}"
    models = [m for s in table.stages_of(cfg) if table.stage(s).kind == "train"
              for m in table.stage(s).models
              if m != "seg_full" or cfg.seg_full]
    lines = out.splitlines()
    seen = {}
    for m in models:
        rank = [x for x in lines if x.startswith(f"[{m}] rank 0/1 on node")]
        assert rank and f"device {kind}" in rank[0], (m, rank, out[-3000:])
        prec = [x for x in lines if x.startswith(f"[{m}] precision:")]
        assert prec and f"on {kind}" in prec[0], (m, prec)
        log = [json.loads(x) for x in (run / m / "log.jsonl").read_text().splitlines()]
        assert log and all(math.isfinite(r["loss"]) for r in log if "loss" in r), (m, log)
        seen[m] = prec[0]
    for stage in ("cams", "aff_labels", "random_walk"):
        marker = json.loads((run / "stages" / f"{stage}.json").read_text())
        assert marker["failed"] == [] and marker["shards_done"] == 2, (stage, marker)
        if kind == "cuda" and stage != "aff_labels":
            assert marker["actors"] == 1, (stage, marker)          # one actor, on the one GPU
    return seen


@pytest.mark.gpu
@pytest.mark.slow
@needs_cuda
@pytest.mark.timeout(200)
@pytest.mark.parametrize("name", REHEARSALS)
def test_rehearsal_config_cut_to_a_few_images_runs_on_cuda(name, tmp_path, capfd, local_ray):
    cfg, run = run_rehearsal(name, tmp_path, local_ray, CUDA)
    print(json.dumps(check_rehearsal(cfg, run, capfd.readouterr().out, CUDA)))


# ------------------------------------------- the helpers on the CPU, in every test run (not gpu)
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_rehearsal_helpers_on_the_cpu(tmp_path, capfd, local_ray):
    """``run_rehearsal`` and ``check_rehearsal`` with the CPU for the device, on the demo config
    (synthetic data and the small models: the real-size rehearsals take minutes on the CPU, and
    tests/pipeline/test_rehearsal.py runs them), cut as the GPU test cuts them."""
    cfg, run = run_rehearsal("demo", tmp_path, local_ray, "cpu")
    assert cfg.device == "cpu" and cfg.synth.num_train == 4 and run == tmp_path / "run"
    seen = check_rehearsal(cfg, run, capfd.readouterr().out, "cpu")
    print(json.dumps(seen))
    assert sorted(seen) == ["aff", "cls", "seg", "seg_full"]      # demo: seg_full true
    assert all(line.startswith(f"[{m}] precision:") for m, line in seen.items()), seen


@pytest.mark.parametrize("name", REHEARSALS)
def test_the_rehearsal_configs_take_the_gpu_tests_overrides(name, tmp_path):
    """The GPU test's cut, as it loads each rehearsal config (a key the config schema does not
    know, or a value it refuses, fails here rather than on the GPU machine)."""
    cfg = load_config(REPO / "configs" / f"{name}.yaml", rehearsal_overrides(tmp_path, CUDA))
    assert cfg.device == CUDA and cfg.data.source == "synth" and cfg.ray.enabled
    assert (cfg.synth.num_train, cfg.synth.num_val, cfg.data.shard_size) == (4, 2, 2)
    for t in ("train_cls", "train_aff", "train_seg"):
        tc = getattr(cfg, t)
        assert (tc.epochs, tc.batch_size, tc.launcher, tc.stop_patience) == (1, 2, "inline", None)
