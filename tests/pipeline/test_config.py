from pathlib import Path

import pytest

from psa_dist.config import Config, ConfigError, load_config, parse_overrides

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_and_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ntrain_cls:\n  epochs: 3\nsynth:\n  image_size: 96\n")
    cfg = load_config(p)
    assert isinstance(cfg, Config)
    assert cfg.name == "x" and cfg.train_cls.epochs == 3 and cfg.synth.image_size == 96
    # untouched sections keep their own defaults, including per-section ones
    assert cfg.train_aff.epochs == 8 and cfg.train_aff.batch_size == 8


def test_overrides_types_and_nesting(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train_aff:\n  lr: 0.1\n")
    cfg = load_config(p, ["train_cls.epochs=2", "cams.scales=[1.0, 0.5]", "aff_labels.crf=false",
                          "train_aff.batch_size=4", "model.pretrained=null", "random_walk.beta=10"])
    assert cfg.train_cls.epochs == 2
    assert cfg.cams.scales == (1.0, 0.5)
    assert cfg.aff_labels.crf is False
    assert cfg.train_aff.lr == 0.1 and cfg.train_aff.batch_size == 4 and cfg.train_aff.epochs == 8
    assert cfg.model.pretrained is None
    assert cfg.random_walk.beta == 10.0 and isinstance(cfg.random_walk.beta, float)


@pytest.mark.parametrize("override,needle", [
    ("train_cls.epohcs=2", "train_cls.epohcs"),
    ("nosuch.x=1", "nosuch"),
    ("train_cls.epochs=two", "train_cls.epochs"),
    ("aff_labels.crf=1", "aff_labels.crf"),
    ("cams.scales=3", "cams.scales"),
    ("random_walk.tol=-1e-3", "random_walk.tol"),
    ("model.aff_stride=16", "model.aff_stride"),
    ("train_seg.missing_class_frac=1.5", "train_seg.missing_class_frac"),
    ("train_aff.missing_class_frac=0.01", "train_aff.missing_class_frac"),
    ("train_cls.optimizer=adam", "train_cls.optimizer"),
    ("train_aff.warmup_epochs=-1", "train_aff.warmup_epochs"),
    ("train_seg.warmup_epochs=11", "train_seg.warmup_epochs"),     # past its 10 epochs
])
def test_bad_keys_are_named(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


def test_bad_key_in_file_names_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train_cls:\n  lr_rate: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "bad.yaml" in str(e.value) and "train_cls.lr_rate" in str(e.value)


def test_override_syntax():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["novalue"])


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/x.yaml")


def test_frozen_layers_are_checked_against_the_backbone_before_the_run():
    from psa_dist.stages.table import unmet_needs
    cfg = load_config(CONFIGS / "voc_resnet38.yaml")
    assert cfg.model.frozen_layers == ("conv1a", "b2") and cfg.model.cls_dropout == 0.5
    assert not [p for p in unmet_needs(cfg, ["train_cls"], lambda s: False) if "frozen" in p]
    bad = load_config(CONFIGS / "voc_resnet38.yaml", ["model.frozen_layers=[conv1a,b2_1]"])
    problems = unmet_needs(bad, ["train_cls"], lambda s: False)
    assert any("model.frozen_layers: 'b2_1'" in p and "b7" in p for p in problems)
    assert not [p for p in unmet_needs(bad, ["random_walk"], lambda s: True) if "frozen" in p]
    with pytest.raises(ConfigError, match="model.cls_dropout"):
        load_config(None, ["model.cls_dropout=1.0"])


def test_numbers_in_exponent_notation_without_a_dot_are_numbers():
    # YAML 1.1 (PyYAML) reads 1e-3 as a string; a learning rate written so must still load
    cfg = load_config(None, ["train_cls.lr=1e-3", "train_aff.lr=5E2", "random_walk.tol=1.5e-5"])
    assert (cfg.train_cls.lr, cfg.train_aff.lr, cfg.random_walk.tol) == (1e-3, 500.0, 1.5e-5)
    with pytest.raises(ConfigError, match="train_cls.lr: expected a number"):
        load_config(None, ["train_cls.lr=fast"])
