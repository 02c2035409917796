"""The eval stage on the shard pool (psa_dist/stages/evaluate.py): per-shard parts summed give the
same figures as scoring the whole split in one process (the single-process scoring that eval was
before, kept below as the reference), in this process and on real Ray actors; a rerun skips the
parts that exist and recomputes a deleted one or one whose inputs changed; a bad shard is named."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from psa_dist.config import load_config
from psa_dist.core.affinity import cells_to_pixels
from psa_dist.core.cam import cam_to_label
from psa_dist.core.image import normalize, pad_to_multiple
from psa_dist.core.metrics import ConfusionMatrix, lost_objects, recall_and_leak, region_recalls
from psa_dist.core.pseudo_labels import perfect_walk_label
from psa_dist.data.shards import decode_sample, iter_joined, output_path, split_shards
from psa_dist.stages.evaluate import parts_dir, run_eval
from psa_dist.stages.run_dir import Run
from psa_dist.stages.model_factory import load_trained

pytestmark = [pytest.mark.slow]

# the tiny config (``tiny_config``)
TINY = dict(name="evaltest", device="cpu", shard_size=3, num_train=15, num_val=6,
            trainers=("train_cls", "train_aff", "train_seg"),
            cams={"scales": [1.0], "flip": False, "batch_size": 4}, aff_labels={"crf": False},
            random_walk={"t": 16}, model={"aff_dims": [8, 8, 8, 16]}, ray={"enabled": False})


# ----------------------------------------------------------------------------- the reference
# eval as one process over the whole split, as it was before the pool (commit 444c128)
def ref_label_shards(root, split, stage_dir, field, num_classes, bg_score=0.2, bg_alpha=16.0,
                     regions=None, aff_stride=8):
    cm = ConfusionMatrix(num_classes + 1)
    labelled = total = 0
    for shard in split_shards(root, split):
        for raw, (lab,) in iter_joined(shard, output_path(stage_dir, shard)):
            gt = decode_sample(raw, ["mask"]).get("mask")
            if gt is None:
                continue
            out = decode_sample(lab, ["cam" if field == "perfect_walk" else field])
            target = torch.from_numpy(gt.astype(np.int64))
            if field == "perfect_walk":
                pred = perfect_walk_label(torch.from_numpy(out["cam"].astype(np.float32)),
                                          decode_sample(raw, ["cls"])["cls"], target, bg_alpha)
            elif field == "cam":
                pred = cam_to_label(torch.from_numpy(out["cam"].astype(np.float32)),
                                    decode_sample(raw, ["cls"])["cls"], bg_score)
            else:
                pred = torch.from_numpy(out[field].astype(np.int64))
            if field == "aff":
                pred = cells_to_pixels(pred, *target.shape, aff_stride)
                keep = pred != 255
                labelled += int(keep.sum())
                total += pred.numel()
                target = torch.where(keep, target, torch.full_like(target, 255))
                pred = torch.where(keep, pred, torch.zeros_like(pred))
            cm.update(pred, target)
            if regions is not None:
                for c, r in region_recalls(pred, target).items():
                    regions[(raw["__key__"], c)] = r
    res = {"miou": cm.miou(), "iou": [float(v) for v in cm.iou()], "confusion": cm.mat.tolist(),
           **recall_and_leak(cm.mat)}
    if field == "aff":
        res["coverage"] = labelled / max(total, 1)
        res["precision"] = float(cm.mat.diag().sum()) / max(float(cm.mat.sum()), 1.0)
    return res


@torch.inference_mode()
def ref_segmenter(model, root, split, num_classes):
    cm = ConfusionMatrix(num_classes + 1)
    for shard in split_shards(root, split):
        for raw, _ in iter_joined(shard):
            s = decode_sample(raw, ["image", "mask"])
            if "mask" not in s:
                continue
            x = normalize(torch.from_numpy(s["image"])[None])
            h, w = x.shape[-2:]
            logits = model(pad_to_multiple(x, 8))[..., :h, :w]
            cm.update(logits.argmax(1)[0], torch.from_numpy(s["mask"].astype(np.int64)))
    return {"miou": cm.miou(), "iou": [float(v) for v in cm.iou()], "confusion": cm.mat.tolist()}


def reference(run):
    cfg, k, res = run.cfg, run.num_classes, {}
    cam_r, walk_r = {}, {}
    res["cam"] = ref_label_shards(run.root, "train", run.stage_dir("cams"), "cam", k,
                                  cfg.cams.eval_bg_score, regions=cam_r)
    res["aff_labels"] = ref_label_shards(run.root, "train", run.stage_dir("aff_labels"), "aff", k,
                                         aff_stride=cfg.model.aff_stride)
    res["rw"] = ref_label_shards(run.root, "train", run.stage_dir("random_walk"), "pseudo", k,
                                 regions=walk_r)
    res["cam"]["objects"] = lost_objects(cam_r)
    res["rw"]["objects"] = lost_objects(walk_r, cam_r)
    res["perfect_walk"] = ref_label_shards(run.root, "train", run.stage_dir("cams"),
                                           "perfect_walk", k, bg_alpha=cfg.random_walk.bg_alpha)
    res["seg"] = ref_segmenter(load_trained(run, "seg", "cpu"), run.root, "val", k)
    return res


def same(a, b):
    # NaN IoUs (a class absent from both) compare equal as JSON text; floats must match exactly
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def trained(tmp_path_factory, trained_run):
    """A run with every stage before eval done (in this process)."""
    base = tmp_path_factory.mktemp("evalpool")
    p, cfg = trained_run(base, ["train_cls", "cams", "aff_labels", "train_aff", "random_walk",
                                "train_seg"], **TINY)
    run = Run(cfg)
    return base, p, reference(run)


def fresh_run(base, cfg_path, name, *over):
    out = base / name
    shutil.copytree(base / "ref", out)
    return Run(load_config(cfg_path, [f"out_dir={out}", *over]))


def part_files(run, what):
    return {p.name: p.stat().st_mtime_ns for p in parts_dir(run, what).glob("*.json")}


def log_lines(run, what):
    return (run.out / "stages" / f"eval_{what}.shards.jsonl").read_text().splitlines()


# ----------------------------------------------------------------------------- tests
def test_pooled_eval_in_this_process_equals_one_pass_and_resumes(trained):
    base, cfg_path, ref = trained
    run = fresh_run(base, cfg_path, "here")
    got = run_eval(run)
    assert same(got, ref), (got["cam"]["miou"], ref["cam"]["miou"])
    assert got["cam"]["objects"]["objects"] > 0 and "dropped" in got["rw"]["objects"]
    labels, seg = part_files(run, "labels"), part_files(run, "seg")
    assert len(labels) == 5 and len(seg) == 2            # one part per train / val shard
    assert len(log_lines(run, "labels")) == 5

    # resume: one part deleted; only it is computed again, the figures are the same
    gone = sorted(labels)[2]
    (parts_dir(run, "labels") / gone).unlink()
    assert same(run_eval(run), ref)
    after = part_files(run, "labels")
    assert set(after) == set(labels)
    assert [n for n in labels if after[n] != labels[n]] == [gone]
    assert part_files(run, "seg") == seg
    assert len(log_lines(run, "labels")) == 6 and len(log_lines(run, "seg")) == 2

    # an input redone (one walk shard rewritten): its part is stale, removed and recomputed
    walk = sorted(run.stage_dir("random_walk").glob("*.tar"))[0]
    data = walk.read_bytes()
    walk.unlink()
    walk.write_bytes(data)          # same labels, a new file: the part's fingerprint changes
    os.utime(walk, ns=(walk.stat().st_atime_ns, walk.stat().st_mtime_ns + 10**9))
    assert same(run_eval(run), ref)
    now = part_files(run, "labels")
    assert len(now) == 5 and len(set(now) - set(after)) == 1
    assert len(log_lines(run, "labels")) == 7


def test_pooled_eval_on_ray_actors_equals_one_pass(trained, local_ray):
    base, cfg_path, ref = trained
    run = fresh_run(base, cfg_path, "onray", "ray.enabled=true")
    with local_ray(num_cpus=2):
        got = run_eval(run)
    assert same(got, ref)
    rows = [json.loads(x) for x in log_lines(run, "labels") + log_lines(run, "seg")]
    pids = {r["pid"] for r in rows}
    assert os.getpid() not in pids and len(rows) == 7   # every shard scored by an actor
    assert len({r["pid"] for r in rows[:5]}) == 2, rows          # by both actors


def test_a_bad_label_shard_is_named(trained):
    base, cfg_path, _ = trained
    run = fresh_run(base, cfg_path, "bad")
    cams = sorted(run.stage_dir("cams").glob("*.tar"))[1]
    cams.write_bytes(cams.read_bytes()[:700])           # truncated
    # the pool's failure (over ray.max_failures) or eval's own check of missing parts: either
    # names the label shard that could not be read
    with pytest.raises(RuntimeError, match=rf"bad/cams/{cams.name} is truncated"):
        run_eval(run)
    assert len(part_files(run, "labels")) == 4           # the other shards' parts are kept
