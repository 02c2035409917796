"""Trainers that stop when they have learned, judged on held-out weak labels only; and the quality
sweep that records the benchmark's goals over data variants."""
import json
import math

import pytest
import torch

from psa_dist.bench.quality import bench_quality, table
from psa_dist.config import ConfigError, load_config
from psa_dist.nets.checkpoint import load_checkpoint
from psa_dist.pipeline import run_pipeline
from psa_dist.stages import table as stage_table


def loss_for(model_name, model, x, y):
    """A model's training loss on one batch (the kinds' losses ignore the config for these)."""
    return stage_table.kind(model_name).losses(None, None)(False)(model, x, y)
from psa_dist.engine.stopping import StopRule
from psa_dist.stages.run_dir import Run
from psa_dist.stages.train import SettingsChanged, _shard_sets, heldout_loader
from psa_dist.stages.model_factory import load_trained
from psa_dist.util.precision import autocast

# the tiny config (``tiny_config``)
TINY = dict(name="stoptest", shard_size=8, num_train=24, num_val=8,
            trainers={"train_cls": {"epochs": 6}, "train_aff": {}, "train_seg": {}},
            cams={"scales": [1.0], "flip": False}, aff_labels={"crf": False},
            random_walk={"t": 8}, model={"aff_dims": [8, 8, 8, 16]}, ray={"enabled": False})


@pytest.fixture
def tiny(tmp_path, tiny_config):
    return tiny_config(tmp_path / "tiny.yaml", tmp_path / "data", **TINY)


def test_stop_rule_on_a_known_curve():
    rule = StopRule(patience=2, min_delta=0.1)
    seen = []
    for epoch, v in enumerate([1.0, 0.8, 0.75, 0.73, 0.74]):
        seen.append((rule.update(epoch, v), rule.stop))
    # 0.75 and 0.73 are within 10% of 0.8: learned after epoch 3; 0.73 stays the lowest
    assert seen == [(True, False), (True, False), (True, False), (True, True), (False, True)]
    assert rule.state["ref_epoch"] == 1 and rule.state["best_epoch"] == 3
    again = StopRule(2, 0.1, json.loads(json.dumps(rule.state)))    # from a checkpoint
    assert again.stop and again.state == rule.state


def test_learned_schedule_holds_then_decays_to_zero():
    from psa_dist.nets.optim import LearnedSchedule, poly_lr_factor
    s = LearnedSchedule(max_steps=100, decay_frac=0.25)
    assert s.window() == (75, 25) and s(10) == 1.0 and s(80) == poly_lr_factor(5, 25)
    assert s.start_decay(40, step_unit=10) == 10         # a quarter of 40 steps, whole epochs
    assert s(39) == 1.0 and s(45) == poly_lr_factor(5, 10) and s(50) == 0.0
    assert s.finished(50) and not s.finished(49)
    assert s.start_decay(45) is None                      # already decaying
    late = LearnedSchedule(100, 0.25)
    assert late.start_decay(90) is None and late.window() == (75, 25)   # the cap's own decay
    again = LearnedSchedule(100, 0.25, state=dict(s.state))             # from a checkpoint
    assert again.window() == (40, 10)


def test_held_out_labels_are_left_out_of_training(tiny, tmp_path):
    cfg = load_config(tiny, [f"out_dir={tmp_path / 'run'}", "train_aff.stop_patience=2",
                             "train_cls.stop_patience=2"])
    run = Run(cfg)
    train, held = _shard_sets(run, "aff", cfg.train_aff)
    assert [s for s, _, _ in train] == run.train_shards[:-1]
    assert [s for s, _, _ in held] == run.train_shards[-1:]
    assert held[0][1] == run.label_shards("aff_labels")[-1]       # its affinity labels
    train, held = _shard_sets(run, "cls", cfg.train_cls)        # the classifier: val's image labels
    assert [s for s, _, _ in train] == run.train_shards and all("val-" in str(s) for s, _, _ in held)
    train, held = _shard_sets(run, "seg", cfg.train_seg)        # not asked: nothing held out
    assert held == [] and len(train) == 3
    with pytest.raises(ValueError, match="holdout_shards=3: the train split has 3 shards"):
        _shard_sets(run, "aff", load_config(tiny, ["train_aff.stop_patience=1",
                                                   "train_aff.holdout_shards=3"]).train_aff)
    with pytest.raises(ConfigError, match="train_seg.stop_patience: must be at least 1"):
        load_config(tiny, ["train_seg.stop_patience=0"])


@pytest.mark.slow
def test_classifier_stops_and_keeps_its_best_epoch(tiny, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(tiny, [f"out_dir={out}", "train_cls.stop_patience=1",
                             "train_cls.stop_min_delta=0.9", "train_cls.epochs=8"])
    run_pipeline(cfg, stages=["train_cls"])
    marker = json.loads((out / "stages" / "train_cls.json").read_text())
    curve = marker["heldout_loss"]
    # no epoch beats the first by 90%: learned after epoch 1, a quarter of 2 epochs (rounded up
    # to one) of decay, then it stops: 3 epochs of the cap's 8, the last at a learning rate of 0
    assert len(curve) == marker["epochs_run"] == 3
    best = marker["best_epoch"]                    # counted from 1, as everything written out
    assert curve[best - 1] == min(curve)
    lines = [json.loads(x) for x in (out / "cls" / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if "epoch_seconds" in r]
    assert [r["lr"] for r in epochs][:2] == [cfg.train_cls.lr] * 2 and epochs[-1]["lr"] == 0.0
    # the weights kept are the best epoch's, and their held-out loss is the curve's, recomputed
    final = load_checkpoint(out / "cls" / "checkpoint.pth")
    kept = load_checkpoint(out / "cls" / "best.pth")
    assert kept["epoch"] == best
    assert all(torch.equal(final["model"][k], kept["model"][k]) for k in kept["model"])
    run = Run(cfg)
    model = load_trained(run, "cls", "cpu")
    total = n = 0.0
    loader = heldout_loader(run, "cls", cfg.train_cls)
    loader.set_epoch(0, 0)
    # in the precision the trainer chose (util/precision.py: timed on a CPU), kept in its checkpoint
    dtype = torch.bfloat16 if final["precision"]["dtype"] == "bfloat16" else None
    with torch.no_grad(), autocast("cpu", dtype):
        for x, y in loader:
            total += float(loss_for("cls", model, x, y)) * x.shape[0]
            n += x.shape[0]
    assert abs(total / n - curve[best - 1]) < 2e-3 * max(1.0, curve[best - 1])
    # the held-out curve is in the log and the report; a rerun trains nothing more
    lines = [json.loads(x) for x in (out / "cls" / "log.jsonl").read_text().splitlines()]
    assert [round(r["heldout_loss"], 5) for r in lines if "heldout_loss" in r] == curve
    # (a job that trained to the end but died before marking the stage done)
    steps = final["step"]
    (out / "stages" / "train_cls.json").unlink()
    run_pipeline(cfg, stages=["train_cls"])
    assert load_checkpoint(out / "cls" / "checkpoint.pth")["step"] == steps
    # ... but not under settings that change what it computes: refused, naming the key, and the
    # checkpoint left as it was; a key of where and how it runs (threads) resumes as before
    (out / "stages" / "train_cls.json").unlink()
    stamp = (out / "cls" / "checkpoint.pth").stat().st_mtime_ns
    other = load_config(tiny, [f"out_dir={out}", "train_cls.stop_patience=1",
                               "train_cls.stop_min_delta=0.9", "train_cls.epochs=8",
                               "train_cls.lr=0.02"])
    with pytest.raises(SettingsChanged, match=r"train_cls\.lr: 0\.01 -> 0\.02.*--from train-cls"):
        run_pipeline(other, stages=["train_cls"])
    assert (out / "cls" / "checkpoint.pth").stat().st_mtime_ns == stamp
    same = load_config(tiny, [f"out_dir={out}", "train_cls.stop_patience=1",
                              "train_cls.stop_min_delta=0.9", "train_cls.epochs=8",
                              "train_cls.threads=1"])
    run_pipeline(same, stages=["train_cls"])
    assert load_checkpoint(out / "cls" / "checkpoint.pth")["step"] == steps


def test_quality_table_marks_each_goal():
    row = {"variant": "v", "cam": 60.0, "walk": 70.0, "walk_gain": 10.0, "cam_recall": 0.8,
           "walk_recall": 0.79, "seg": 70.0, "seg_full": 80.0, "seg_ratio": 0.875,
           "final_loss": {"cls": 0.2}, "minutes": 10.0, "goals_met": False}
    fit = {"cls": {"run": 23, "fit": 19, "prior_loss": 0.55, "train_loss": []},
           "aff": {"run": 12, "best": 11, "heldout_loss": []}}
    text = table([row, {**row, "variant": "w", "walk_recall": 0.85, "goals_met": True,
                        "epochs": fit, "objects": {"walk_dropped": 0.0062}}])
    assert "0.800 → 0.790 | - |" in text and "0.800 → 0.850 | 0.6% |" in text
    assert "**not met**" in text and "| 1/2 |" in text
    assert "0.200 (23, fit after 19) | 12, kept 11 |" in text
    assert "0.200 | - |" in text          # no stopping rule: the fixed epochs, not shown


@pytest.mark.slow
def test_quality_sweep_runs_each_variant_once(tiny, tmp_path):
    variants = {"a": [], "b": ["synth.seed=1"]}
    over = ["train_cls.epochs=1", "train_cls.launcher=inline", "train_aff.launcher=inline",
            "train_seg.launcher=inline", "seg_full=true"]
    rows = bench_quality(str(tiny), None, tmp_path / "q", over, variants=variants)
    assert [r["variant"] for r in rows] == ["a", "b"]
    for r in rows:
        report = json.loads((tmp_path / "q" / r["variant"] / "report.json").read_text())
        assert r["walk"] == report["miou"]["rw"] and r["seg_ratio"] == report["seg_vs_full"]
    assert (tmp_path / "q" / "a" / "data" / "dataset.json").is_file()   # its own data
    stamp = (tmp_path / "q" / "a" / "report.json").stat().st_mtime_ns
    again = bench_quality(str(tiny), None, tmp_path / "q", over, variants=variants)
    assert len(again) == 2 and (tmp_path / "q" / "a" / "report.json").stat().st_mtime_ns == stamp
    assert "mean (min – max)" in (tmp_path / "q" / "quality.md").read_text()
    # from the walk on, with another number of steps: the classifier is kept, the rows replaced
    a = tmp_path / "q" / "a"
    cls_stamp = (a / "cls" / "checkpoint.pth").stat().st_mtime_ns
    kept = json.loads((a / "stages" / "train_cls.json").read_text())["seconds"]
    redone = bench_quality(str(tiny), ["a"], tmp_path / "q", over + ["random_walk.t=4"],
                           variants=variants, redo_from="random_walk")
    lines = (tmp_path / "q" / "quality.jsonl").read_text().splitlines()
    assert [json.loads(x)["variant"] for x in lines] == ["a", "b"]
    row = json.loads(lines[0])
    assert row["redone_from"] == "random_walk" and "random_walk.t=4" in row["overrides"]
    assert row == redone[0] and json.loads(lines[1]) == rows[1]
    assert json.loads((a / "stages" / "random_walk.json").read_text())["settings"][
        "random_walk.t"] == 4
    assert (a / "cls" / "checkpoint.pth").stat().st_mtime_ns == cls_stamp
    assert row["minutes"] >= kept / 60 - 0.05    # the kept stages' time is in the row
    with pytest.raises(ValueError, match="unknown stage 'walk'"):
        bench_quality(str(tiny), ["a"], tmp_path / "q", over, variants=variants, redo_from="walk")
    # both methods: psa's row is recorded, IRN runs in a's directory on its classifier and CAMs
    irn_over = over + ["random_walk.t=4", "train_irn.launcher=inline", "train_irn.epochs=1",
                       "train_irn.crop_size=64", "irn_walk.t=8", "ir_labels.crf=false"]
    both = bench_quality(str(tiny), ["a"], tmp_path / "q", irn_over, variants=variants,
                         methods=["psa", "irn"])
    assert [(r["variant"], r["method"]) for r in both] == [("a", "psa"), ("a", "irn"), ("b", "psa")]
    psa, irn = both[0], both[1]
    assert psa == row and irn["cam"] == psa["cam"] and irn["cam_recall"] == psa["cam_recall"]
    assert (a / "cls" / "checkpoint.pth").stat().st_mtime_ns == cls_stamp
    shared = sum(json.loads((a / "stages" / f"{s}.json").read_text())["seconds"]
                 for s in ("train_cls", "cams"))
    assert irn["minutes"] >= shared / 60 - 0.05         # the kept classifier's and CAMs' time
    md = (tmp_path / "q" / "quality.md").read_text()
    assert "### irn" in md and "### psa" in md and "### side by side" in md
    assert f"| a | {psa['cam']:.1f} | {psa['walk']:.1f} ({psa['walk_gain']:+.1f}) |" in md
    assert f"{irn['walk']:.1f} ({irn['walk_gain']:+.1f})" in md.split("### side by side")[1]
    report = json.loads((a / "report.json").read_text())
    assert set(report["methods"]) == {"psa", "irn"}


def test_objects_lost_and_dropped_against_a_count_by_hand():
    from psa_dist.core.metrics import lost_objects, region_recalls
    target = torch.zeros(10, 10, dtype=torch.long)
    target[:5, :5] = 2                  # 25 pixels of class 2
    target[6:, 6:] = 3                  # 16 pixels of class 3
    target[0, 9] = 255
    pred = torch.zeros_like(target)
    pred[:5, :2] = 2                    # 10 of 25
    pred[6:7, 6:8] = 3                  # 2 of 16
    pred[0, 9] = 3                      # an ignored pixel says nothing
    assert region_recalls(pred, target) == {2: 10 / 25, 3: 2 / 16}
    cam = {("a", 2): 0.5, ("a", 3): 0.6, ("b", 1): 0.1}
    walk = {("a", 2): 0.4, ("a", 3): 0.125, ("b", 1): 0.9}
    got = lost_objects(walk, cam)
    # lost by the walk: (a, 3) of 3 objects; of the 2 the CAM found, the walk lost 1
    assert got == {"objects": 3, "lost": 1 / 3, "dropped": 1 / 2}
    assert lost_objects(cam) == {"objects": 3, "lost": 1 / 3}


def test_a_diverging_trainer_stops_naming_the_keys_and_keeps_no_nan_checkpoint(tiny, tmp_path):
    # a learning rate of 1e6 blows the classifier up within its first steps: the trainer must stop
    # with an error that names the step and the keys to change, and leave no non-finite weights
    from psa_dist.engine.loop import TrainingDiverged
    out = tmp_path / "run"
    cfg = load_config(tiny, [f"out_dir={out}", "train_cls.lr=1e6", "train_cls.log_every=1",
                             "train_cls.checkpoint_every=1", "train_cls.epochs=3"])
    with pytest.raises(TrainingDiverged, match=r"train_cls\.lr.*train_cls\.amp=none"):
        run_pipeline(cfg, stages=["train_cls"])
    assert not (out / "stages" / "train_cls.json").exists()        # the stage is not done
    ck = out / "cls" / "checkpoint.pth"
    if ck.exists():                                                 # written before it diverged
        weights = load_checkpoint(ck)["model"]
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    lines = [json.loads(x) for x in (out / "cls" / "log.jsonl").read_text().splitlines()]
    assert 0 < len(lines) < 18          # it trained, then stopped within the first of 3 epochs


def test_fit_rule_on_a_known_curve():
    from psa_dist.engine.stopping import FitRule
    rule = FitRule(target=0.5, window=2, prior=1.0)
    fired = [rule.update(e, v) for e, v in enumerate([0.9, 0.6, 0.5, 0.45, 0.3, 0.2])]
    # the mean of the last two epochs: 0.75, 0.55, 0.475 <= 0.5 at epoch 3; fires once only
    assert fired == [False, False, False, True, False, False]
    assert rule.state["fit_epoch"] == 3
    again = FitRule(0.5, 2, 1.0, json.loads(json.dumps(rule.state)))     # from a checkpoint
    assert again.state == rule.state and not again.update(6, 0.1)


def test_fit_rule_class_by_class_waits_for_the_hardest_class():
    from psa_dist.engine.stopping import FitRule
    # three classes: the third is always present (prior 0: nothing to learn, left out); the
    # second is learned late. The mean rule fires at epoch 2 (the 2-epoch mean of the mean loss,
    # 0.317, is at most 0.5 x the mean prior 2/3); the class rule waits for class 1 (from 0)
    prior = [1.0, 1.0, 0.0]
    curve = [[0.40, 0.90, 0.0], [0.30, 0.80, 0.0], [0.20, 0.60, 0.0], [0.10, 0.40, 0.0],
             [0.10, 0.30, 0.0]]
    rule = FitRule(0.5, 2, sum(prior) / 3, class_prior=prior)
    plain = FitRule(0.5, 2, sum(prior) / 3)
    fired, fired_plain = [], []
    for e, c in enumerate(curve):
        fired.append(rule.update(e, sum(c) / 3, c))
        fired_plain.append(plain.update(e, sum(c) / 3))
    # class 1's 2-epoch means: 0.85, 0.70, 0.50 (epoch 3); class 0's are long below 0.5
    assert fired == [False, False, False, True, False] and rule.state["fit_epoch"] == 3
    assert fired_plain.index(True) == 2         # the mean of all classes was fit earlier
    ratios = rule.class_ratios()                # the last window: epochs 3 and 4
    assert ratios[2] is None and abs(ratios[0] - 0.1) < 1e-12 and abs(ratios[1] - 0.35) < 1e-12
    again = FitRule(0.5, 2, 2 / 3, json.loads(json.dumps(rule.state)), class_prior=[9, 9, 9])
    assert again.state == rule.state            # the checkpoint's state, not the argument


def test_class_losses_are_the_loss_class_by_class():
    from psa_dist.nets.models import Classifier
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 4, generator=g, dtype=torch.float64) * 3
    labels = (torch.rand(7, 4, generator=g) < 0.4).double()
    # naively: -[y log s(x) + (1 - y) log(1 - s(x))] for each entry, averaged over the images
    naive = [sum(-(float(labels[i, c]) * math.log(1 / (1 + math.exp(-float(logits[i, c]))))
                   + (1 - float(labels[i, c])) * math.log(1 - 1 / (1 + math.exp(-float(logits[i, c])))))
                 for i in range(7)) / 7 for c in range(4)]
    terms = Classifier.class_losses(logits, labels)
    assert max(abs(float(a) - b) for a, b in zip(terms, naive)) < 1e-9
    assert abs(float(terms.mean()) - float(Classifier.loss(logits, labels))) < 1e-12
    freq = torch.tensor([0.1, 0.5, 0.0, 1.0])
    priors = Classifier.prior_losses(freq)
    assert abs(float(priors[1]) - math.log(2)) < 1e-9 and float(priors[2:].abs().max()) < 1e-9
    assert abs(float(priors.mean()) - Classifier.prior_loss(freq)) < 1e-12


def test_prior_loss_is_the_loss_of_predicting_the_label_frequencies():
    from psa_dist.nets.models import Classifier
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(500, 5, generator=g) < torch.tensor([0.1, 0.3, 0.5, 0.02, 0.0])).float()
    freq = labels.mean(0)
    # a classifier that outputs each class's frequency for every image, scored by the loss itself
    logits = torch.logit(freq.clamp(1e-12, 1 - 1e-12)).expand_as(labels)
    by_loss = float(Classifier.loss(logits.double(), labels.double()))
    assert abs(Classifier.prior_loss(freq) - by_loss) < 1e-6
    # and no constant prediction does better (the frequencies minimise the expected loss)
    for shift in (-0.3, 0.3):
        worse = float(Classifier.loss((logits + shift).double(), labels.double()))
        assert worse > by_loss


def test_fit_target_is_checked_by_name(tiny):
    with pytest.raises(ConfigError, match="train_aff.fit_target: only train_cls"):
        load_config(tiny, ["train_aff.fit_target=0.3"])
    with pytest.raises(ConfigError, match=r"train_cls.fit_target: must be in \(0, 1\)"):
        load_config(tiny, ["train_cls.fit_target=1.5"])
    with pytest.raises(ConfigError, match="fit_target and train_cls.stop_patience"):
        load_config(tiny, ["train_cls.fit_target=0.3", "train_cls.stop_patience=2"])
    with pytest.raises(ConfigError, match="train_cls.fit_each_class: needs train_cls.fit_target"):
        load_config(tiny, ["train_cls.fit_each_class=true"])


@pytest.mark.slow
@pytest.mark.parametrize("each_class", [False, True], ids=["mean", "each_class"])
def test_classifier_trains_until_it_fits_its_labels(tiny, tmp_path, each_class):
    from psa_dist.data.shards import decode_sample, iter_split
    from psa_dist.nets.models import Classifier
    out = tmp_path / "run"
    cfg = load_config(tiny, [f"out_dir={out}", "train_cls.fit_target=0.9",
                             "train_cls.fit_window=2", "train_cls.epochs=40",
                             "train_cls.lr=0.02", "train_cls.log_every=3",
                             f"train_cls.fit_each_class={str(each_class).lower()}"])
    run_pipeline(cfg, stages=["train_cls"])
    marker = json.loads((out / "stages" / "train_cls.json").read_text())
    # the labels' frequencies, counted here from the train split's image labels
    freq = torch.zeros(Run(cfg).num_classes, dtype=torch.float64)
    samples = [decode_sample(r, ("cls",))["cls"] for r in iter_split(cfg.data.root, "train")]
    for classes in samples:
        freq[torch.tensor(classes, dtype=torch.long) - 1] += 1
    assert abs(marker["prior_loss"] - Classifier.prior_loss(freq / len(samples))) < 1e-5
    curve, prior = marker["train_loss"], marker["prior_loss"]
    lines = [json.loads(x) for x in (out / "cls" / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if "epoch_seconds" in r]
    assert [round(r["loss"], 5) for r in epochs] == curve
    # fit after the first epoch (counted from 1) whose 2-epoch mean is within 0.9 of the prior
    means = {e: (curve[e - 2] + curve[e - 1]) / 2 for e in range(2, len(curve) + 1)}
    fit = min(e for e, m in means.items() if m <= 0.9 * prior)
    if each_class:   # ... for every class on its own, with its own prior (0: left out)
        priors = Classifier.prior_losses(freq / len(samples)).tolist()
        assert max(abs(a - b) for a, b in zip(marker["class_prior_loss"], priors)) < 1e-5
        per_class = [r["class_loss"] for r in epochs]
        assert marker["class_train_loss"] == per_class
        assert all(abs(sum(c) / len(c) - r["loss"]) < 1e-4 for c, r in zip(per_class, epochs))
        fit = min(e for e in range(2, len(per_class) + 1)
                  if all((a + b) / 2 <= 0.9 * p for a, b, p in
                         zip(per_class[e - 2], per_class[e - 1], priors) if p > 1e-9))
    else:
        assert "class_loss" not in epochs[0] and "class_train_loss" not in marker
    assert marker["fit_epoch"] == fit
    assert [r["epoch"] for r in epochs] == list(range(1, len(curve) + 1))
    # constant learning rate to the fit, then a quarter of the epochs so far (at least one) of
    # decay to 0, and training stops before the cap
    decay = max(1, round(0.25 * fit))
    assert marker["epochs_run"] == len(curve) == fit + decay < 40
    assert all(r["lr"] == cfg.train_cls.lr for r in epochs[:fit])
    assert epochs[-1]["lr"] == 0.0
    # the ETA counts to the cap until the fit, then to the last step of the decay
    steps = [r for r in lines if "of" in r]
    assert {r["eta_to"] for r in steps if r["epoch"] <= fit} == {"cap"}
    assert {r["eta_to"] for r in steps if r["epoch"] > fit} == {"end"}
    assert {r["eta_to"] for r in epochs[fit:]} == {"end"}
    report_epochs = __import__("psa_dist.stages.report", fromlist=["x"]).stopping_epochs(Run(cfg))
    assert report_epochs["cls"]["fit"] == fit and report_epochs["cls"]["train_loss"] == curve


def test_redo_from_per_method_keeps_the_methods_on_one_set_of_cams():
    from psa_dist.bench.quality import redo_per_method
    assert redo_per_method(None, ["psa", "irn"]) == {"psa": None, "irn": None}
    # a shared stage: the CAMs once, by the first method; the later one redoes its own stages
    assert redo_per_method("cams", ["psa", "irn"]) == {"psa": "cams", "irn": "ir_labels"}
    assert redo_per_method("train_cls", ["irn", "psa"]) == {"irn": "train_cls",
                                                            "psa": "aff_labels"}
    # the first method's own stage: the other runs without --from (the switch redoes the rest)
    assert redo_per_method("random_walk", ["psa", "irn"]) == {"psa": "random_walk", "irn": None}
    assert redo_per_method("train_seg", ["psa", "irn"]) == {"psa": "train_seg",
                                                            "irn": "train_seg"}
    with pytest.raises(ValueError, match="not a stage of method=irn"):
        redo_per_method("random_walk", ["irn", "psa"])
    with pytest.raises(ValueError, match="unknown stage"):
        redo_per_method("walk", ["psa"])


def test_kept_seconds_counts_the_markers_older_than_the_run(tmp_path):
    import os
    from psa_dist.bench.quality import _kept_seconds
    (tmp_path / "stages").mkdir()
    seconds = {"train_cls": 100.0, "cams": 20.0, "ir_labels": 3.0, "eval": 2.0}
    for name, s in seconds.items():
        (tmp_path / "stages" / f"{name}.json").write_text(json.dumps({"seconds": s}))
    (tmp_path / "report.json").write_text(json.dumps({"stage_seconds": seconds}))
    started = 1_000_000.0
    for name in ("train_cls", "cams"):                  # kept: written before the run started
        os.utime(tmp_path / "stages" / f"{name}.json", (started - 60, started - 60))
    for name in ("ir_labels", "eval"):                  # run now
        os.utime(tmp_path / "stages" / f"{name}.json", (started + 5, started + 5))
    assert _kept_seconds(tmp_path, started) == 120.0
    assert _kept_seconds(tmp_path, started - 3600) == 0.0     # a fresh run keeps nothing


def test_the_report_keeps_the_other_methods_figures_only_on_the_same_cams(tmp_path):
    from types import SimpleNamespace
    from psa_dist.stages.report import _other_methods
    from psa_dist.stages.run_dir import RunDir

    class Run(RunDir):
        cfg = SimpleNamespace(method="irn")
    run = Run(tmp_path)
    run.stages.mkdir()
    run.marker("cams").write_text(json.dumps({"seconds": 20.0}))
    from psa_dist.stages.report import _cams_stamp
    psa = {"cams": _cams_stamp(run), "walk": 90.0}
    (tmp_path / "report.json").write_text(json.dumps(
        {"method": "psa", "methods": {"psa": psa, "irn": {"cams": _cams_stamp(run)}}}))
    assert _other_methods(run) == {"psa": psa}          # this method's own entry is replaced
    run.marker("cams").write_text(json.dumps({"seconds": 21.0}))       # the CAMs redone
    assert _other_methods(run) == {}
    (tmp_path / "report.json").write_text("{")                         # cut short: nothing kept
    assert _other_methods(run) == {}
