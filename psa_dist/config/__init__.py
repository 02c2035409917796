"""Typed configuration: YAML files map onto these dataclasses, with dotted command-line overrides.

`load_config("configs/demo.yaml", ["train_cls.epochs=2"])` returns a `Config`. Every key is checked:
an unknown key or a value of the wrong type raises `ConfigError` naming the dotted key (and the
file it came from), so a typo never silently falls back to a default. The sections are in
``sections.py``; the checks across keys here.

Layer 1: imports nothing of the project (torch neither: the command line's parser reads it).
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .sections import (AffLabelConfig, CamConfig, Config, DataConfig, IrLabelConfig,
                       IrnWalkConfig, JobConfig, ModelConfig, RandomWalkConfig, RayConfig,
                       SynthConfig, TrainConfig)

__all__ = ["AffLabelConfig", "CamConfig", "Config", "ConfigError", "DataConfig", "IrLabelConfig",
           "IrnWalkConfig", "JobConfig", "ModelConfig", "RandomWalkConfig", "RayConfig",
           "SynthConfig", "TrainConfig", "load_config", "parse_overrides"]


METHODS = ("psa", "irn")        # the pseudo labels' method after the CAMs
TRAINERS = ("train_cls", "train_aff", "train_irn", "train_seg")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
# type -> (whether a YAML value is one, as the error says it); bool is an int to Python, not here
_PLAIN = {bool: (lambda v: isinstance(v, bool), "true/false"),
          int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
          str: (lambda v: isinstance(v, str), "a string")}


def _check_value(key: str, value: Any, tp: Any, default: Any = None) -> Any:
    """Coerce `value` to the annotated type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(key, value, inner[0], default)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return _build(tp, value, key + ".", default)
    if tp in _PLAIN:
        fits, what = _PLAIN[tp]
        if fits(value):
            return value
        raise ConfigError(f"{key}: expected {what}, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
            return float(value)     # YAML 1.1 reads 1e-3 (no dot) as a string
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp in (tuple, list):
        if isinstance(value, (list, tuple)):
            return tp(value)
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, values: dict, prefix: str = "", base: Any = None) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in values:
        if k not in names:
            raise ConfigError(f"unknown config key '{prefix}{k}' (valid: {', '.join(sorted(names))})")
    obj = base if base is not None else cls()  # nested sections keep their parent's defaults
    for k, v in values.items():
        setattr(obj, k, _check_value(prefix + k, v, hints[k], getattr(obj, k)))
    return obj


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """`["a.b=1", "c=[1, 2]"]` -> nested dict; values parsed as YAML scalars / lists."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return tree


def _checked(cfg: Config) -> Config:
    """The checks across keys, each error naming the key."""
    if cfg.model.aff_stride not in (4, 8):
        raise ConfigError(f"model.aff_stride: must be 4 or 8, got {cfg.model.aff_stride}")
    if cfg.model.seg_from_classifier and cfg.model.segmenter != "light":
        raise ConfigError(f"model.seg_from_classifier: needs model.segmenter=light (the "
                          f"classifier's backbone), got {cfg.model.segmenter!r}")
    if not 0 <= cfg.model.cls_dropout < 1:
        raise ConfigError(f"model.cls_dropout: must be in [0, 1), got {cfg.model.cls_dropout}")
    if not all(isinstance(n, str) for n in cfg.model.frozen_layers):
        raise ConfigError(f"model.frozen_layers: expected a list of layer names, got "
                          f"{list(cfg.model.frozen_layers)!r}")
    frac = cfg.train_seg.missing_class_frac
    if frac is not None and not 0 <= frac < 1:
        raise ConfigError(f"train_seg.missing_class_frac: must be in [0, 1) or null, got {frac}")
    for key, owners, unset in (("missing_class_frac", ("train_seg",), None),   # else ignored
                               ("pair_border", ("train_aff", "train_irn"), "all")):
        for name in (n for n in TRAINERS if n not in owners):
            if getattr(getattr(cfg, name), key) != unset:
                raise ConfigError(f"{name}.{key}: only {' and '.join(owners)} use it")
    if cfg.train_aff.crop_size % cfg.model.aff_stride:
        raise ConfigError(f"train_aff.crop_size: must be a multiple of model.aff_stride "
                          f"({cfg.model.aff_stride}: its labels are cropped on whole cells), "
                          f"got {cfg.train_aff.crop_size}")
    _check_irn(cfg)
    for name in TRAINERS:
        t = getattr(cfg, name)
        if t.pair_border not in ("all", "authors"):
            raise ConfigError(f"{name}.pair_border: must be all or authors, got {t.pair_border!r}")
        t = getattr(cfg, name)
        if t.stop_patience is not None and t.stop_patience < 1:
            raise ConfigError(f"{name}.stop_patience: must be at least 1 or null, got "
                              f"{t.stop_patience}")
        if not 0 < t.stop_decay <= 1:
            raise ConfigError(f"{name}.stop_decay: must be in (0, 1], got {t.stop_decay}")
        if t.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"{name}.optimizer: must be sgd or adamw, got {t.optimizer!r}")
        if not 0 <= t.warmup_epochs <= t.epochs:
            raise ConfigError(f"{name}.warmup_epochs: must be in [0, {name}.epochs = "
                              f"{t.epochs}], got {t.warmup_epochs}")
        if t.holdout_shards < 1:
            raise ConfigError(f"{name}.holdout_shards: must be at least 1, got {t.holdout_shards}")
        if t.fit_target is not None:
            if name != "train_cls":
                raise ConfigError(f"{name}.fit_target: only train_cls uses it (AffinityNet "
                                  f"and the segmenters stop on held-out labels: "
                                  f"{name}.stop_patience)")
            if not 0 < t.fit_target < 1:
                raise ConfigError(f"{name}.fit_target: must be in (0, 1), got {t.fit_target}")
            if t.stop_patience is not None:
                raise ConfigError(f"{name}.fit_target and {name}.stop_patience: one rule "
                                  f"decides when to stop; set the other to null")
        if t.fit_each_class and t.fit_target is None:
            raise ConfigError(f"{name}.fit_each_class: needs {name}.fit_target (the share "
                              f"of each class's prior loss to reach)")
        if t.fit_window < 1:
            raise ConfigError(f"{name}.fit_window: must be at least 1, got {t.fit_window}")
    if not 0 <= cfg.random_walk.tol < 1:
        raise ConfigError(f"random_walk.tol: must be in [0, 1), got {cfg.random_walk.tol}")
    return cfg


def _check_irn(cfg: Config) -> None:
    if cfg.method not in METHODS:
        raise ConfigError(f"method: must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    m = cfg.model
    if m.irn_backbone not in ("classifier", "pretrained"):
        raise ConfigError(f"model.irn_backbone: must be classifier or pretrained, got "
                          f"{m.irn_backbone!r}")
    if m.irn_backbone == "pretrained" and not m.pretrained:
        raise ConfigError("model.irn_backbone=pretrained: needs model.pretrained (the frozen "
                          "backbone's weights)")
    if m.irn_radius < 2:
        raise ConfigError(f"model.irn_radius: must be at least 2, got {m.irn_radius}")
    if cfg.train_irn.crop_size % 4:
        raise ConfigError(f"train_irn.crop_size: must be a multiple of 4 (the boundary map's "
                          f"stride), got {cfg.train_irn.crop_size}")
    if not 0 <= cfg.irn_walk.tol < 1:
        raise ConfigError(f"irn_walk.tol: must be in [0, 1), got {cfg.irn_walk.tol}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults), apply dotted overrides, validate every key."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        tree = loaded
    tree = _merge(tree, parse_overrides(overrides or []))
    try:
        return _checked(_build(Config, tree))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
