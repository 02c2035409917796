"""Typed configuration: YAML files map onto these dataclasses, with dotted command-line overrides.

`load_config("configs/demo.yaml", ["train_cls.epochs=2"])` returns a `Config`. Every key is checked:
an unknown key or a value of the wrong type raises `ConfigError` naming the dotted key (and the
file it came from), so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


@dataclass
class SynthConfig:
    """The embedded synthetic dataset (see psa_dist/data/synth.py for what each knob does)."""
    seed: int = 0
    image_size: int = 160           # the long side, in pixels, when size_range is None
    # Images of varying size, as real datasets have: the long side drawn per image in
    # [min, max] pixels (VOC: up to 500; COCO: up to 640). None: every long side image_size.
    size_range: Optional[tuple] = None
    aspect_range: tuple = (1.0, 1.0)    # width / height, drawn log-uniformly per image (VOC ~[0.5, 2])
    num_train: int = 800
    num_val: int = 200
    num_classes: int = 6            # up to 8 patterns, then pattern x colour (80: COCO-shaped)
    min_objects: int = 1
    max_objects: int = 3
    # Distinct classes among an image's objects, drawn in [min, max] (at most its objects); the
    # objects' classes are drawn among those. None: each object's class drawn on its own.
    classes_per_image: Optional[tuple] = None
    mark: str = "colour"            # colour: class pattern in a class colour | texture: luminance only
    body_pattern: float = 0.11      # strength of the class mark over the whole body (0 = none)
    part_fraction: float = 0.22     # share of the object's length that carries the strong pattern
    part_prob: float = 0.7          # probability that an object shows its part (else body mark only)
    object_width: tuple = (0.15, 0.24)  # object width range, as a share of the image's short side
    # Each object's length and width scaled by a factor drawn log-uniformly in this range: objects
    # of very different sizes in one image, small ones included ((0.1, 1.0): from a tenth of the
    # default size up). (1.0, 1.0): the default sizes, nothing drawn.
    object_scale: tuple = (1.0, 1.0)
    clutter_density: float = 1.0    # multiplier on the number of background clutter strokes
    clutter_noise: float = 12.0     # std of per-pixel colour noise over the whole image (0..255)


@dataclass
class DataConfig:
    root: str = "data/synth"        # dataset directory: {split}-NNNNNN.tar shards + dataset.json
    # Read the shards from elsewhere: a WebDataset URL template with {name} (and {root}), e.g.
    # "pipe:aws s3 cp s3://bucket/voc/{name} -"; dataset.json is still read from root. None: root/name
    shard_url: Optional[str] = None
    source: str = "synth"           # synth | voc | coco | shards (synth: generated into root when
                                    # missing; the others: converted shards, used as they are)
    train_split: str = "train"
    val_split: str = "val"
    shard_size: int = 100           # samples per shard when the dataset is written
    workers: int = 2                # processes for generation / conversion / decoding


@dataclass
class ModelConfig:
    backbone: str = "small"         # small | resnet50 | resnet38
    pretrained: Optional[str] = None  # path to a local weights file (None: random init, logged)
    seg_pretrained: Optional[str] = None  # weights of the segmenter's backbone when it is not
                                          # model.backbone (deeplabv3_resnet50: a ResNet-50 file);
                                          # None: model.pretrained where the backbones match
    segmenter: str = "light"        # light | deeplabv3_resnet50
    freeze_bn: bool = False
    # Backbone layers whose weights the classifier and AffinityNet do not train (its child
    # modules' names: ResNet-38 conv1a, b2, ..., b7; ResNet-50 stem, layer1, ...). The authors
    # freeze ResNet-38's conv1a and stage 2 (their b2, b2_1, b2_2: our b2): [conv1a, b2].
    frozen_layers: tuple = ()
    cls_dropout: float = 0.0          # Dropout2d on the classifier's features before pooling
                                      # (the authors' dropout7: 0.5); CAMs never see it
    aff_dims: Optional[tuple] = None  # AffinityNet reduction per backbone tap (None: the backbone's
                                      # default; ResNet-38: 64/128/256 = 448 channels as the paper)
    aff_stride: int = 8               # AffinityNet's output grid, where the walk runs: 8 (paper) or 4
    # The light segmenters (pseudo-label and fully supervised alike) start from the trained
    # classifier's backbone, as AffinityNet does: without ImageNet weights, the image-label
    # classifier is the pretraining there is (no pixel label is used).
    seg_from_classifier: bool = False


@dataclass
class JobConfig:
    """Where a stage runs and the SLURM job it gets there (trainers and Ray label stages alike)."""
    # Trainers: inline (this process), torchrun (ranks from its environment), local (submitit's
    # local executor, tasks_per_node processes) or slurm (submitit, sbatch). Ray stages: inline
    # (ray.init here, or ray.address), local or slurm (a submitit job that starts Ray on its nodes
    # and runs the stage there).
    launcher: str = "inline"
    nodes: int = 1
    gpus_per_node: int = 1          # 0 on CPU-only clusters (and the local test cluster)
    tasks_per_node: Optional[int] = None    # DDP ranks per node; None: one per GPU (1 without)
    cpus_per_task: int = 2
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    time_min: int = 60
    mem_gb: Optional[int] = None
    sbatch_extra: list = field(default_factory=list)


@dataclass
class TrainConfig(JobConfig):
    """Settings shared by the three trainers (classifier, AffinityNet, segmenter)."""
    epochs: int = 10
    batch_size: int = 16
    lr: float = 0.01
    weight_decay: float = 5e-4
    momentum: float = 0.9           # the authors' code passes 5e-4 here by accident; we use 0.9
    crop_size: int = 448
    resize_long: Optional[tuple] = (256, 512)   # null: no rescaling
    color_jitter: tuple = (0.3, 0.3, 0.3, 0.1)
    num_workers: int = 2
    threads: Optional[int] = None   # intra-op threads per CPU rank; None: its CPUs less num_workers
    log_every: int = 20             # steps between JSON log lines
    checkpoint_every: int = 500     # steps between checkpoints (and one at every epoch end)
    tensorboard: bool = False       # also log to <model dir>/tensorboard (psa-dist[tensorboard])
    # Stop when the model has learned, judged on held-out weak labels only: the classifier on the
    # val split's image labels, AffinityNet and the segmenters on the last holdout_shards train
    # shards' affinity / pseudo labels (left out of their training). epochs is then a cap: the
    # learning rate stays constant until the held-out loss has not improved by stop_min_delta
    # (relative) for stop_patience epochs, then decays (poly) over stop_decay of the epochs so
    # far, and training stops; the weights of the best held-out epoch are kept. None: the
    # paper's poly schedule over epochs epochs.
    stop_patience: Optional[int] = None
    stop_min_delta: float = 0.01
    stop_decay: float = 0.25
    # Stop when the classifier fits its own training labels (train_cls only; docs/guide.md): the
    # CAMs are taken on the training images, so what they need is the fit there, which goes on
    # improving long after a held-out loss has flattened (docs/benchmark.md, rounds 9 and 11).
    # epochs is then a cap: the learning rate stays constant until the mean training loss of the
    # last fit_window epochs is at most fit_target x the labels' prior loss (each class predicted
    # at its frequency in the train split: what a classifier that has learned nothing from the
    # images scores), then decays (poly) over stop_decay of the epochs so far. None: poly over
    # epochs epochs.
    fit_target: Optional[float] = None
    fit_window: int = 3
    # With fit_target: the rule holds for every class on its own (each class's training loss at
    # most fit_target x that class's prior loss), not only for their mean, so that one class the
    # classifier has not learned cannot hide behind easy ones (docs/benchmark.md, round 12).
    fit_each_class: bool = False
    holdout_shards: int = 1
    amp: str = "bf16"               # bf16 | bf16! | fp16 | none: autocast on CUDA; on a CPU bf16
                                    # where timing the model says it is faster (util/precision.py),
                                    # bf16! forced
    # Segmenter on pseudo labels only: where a class of the image label covers less than this
    # fraction of an image's pseudo label, that image's background is left out of the loss
    # (cam.distrust_background). None: the paper's plain training on every pseudo-label pixel.
    missing_class_frac: Optional[float] = None
    # AffinityNet's loss only: which pairs of a crop it takes. all: every pair with both ends in
    # the crop; authors: the authors' window (jiwoon-ahn/psa), which drops the pairs starting in
    # the last radius - 1 rows or the first / last radius - 1 columns (docs/voc.md).
    pair_border: str = "all"


@dataclass
class CamConfig:
    scales: tuple = (1.0, 0.5, 1.5, 2.0)
    flip: bool = True
    eval_bg_score: float = 0.2      # constant background score when CAMs are scored as labels
    batch_size: int = 8
    amp: str = "bf16"               # the classifier's forward under autocast, as train_*.amp


@dataclass
class AffLabelConfig:
    alpha_lo: float = 4.0
    alpha_hi: float = 32.0
    crf: bool = True                # dense CRF on both score maps (the authors' code does this)
    crf_iters: int = 10
    crf_gauss_sxy: float = 3.0
    crf_gauss_compat: float = 3.0
    crf_bi_sxy: float = 80.0
    crf_bi_srgb: float = 13.0
    crf_bi_compat: float = 10.0


@dataclass
class RandomWalkConfig:
    beta: float = 8.0
    t: int = 256
    radius: int = 5
    bg_alpha: float = 16.0
    batch_size: int = 8             # images walked together (exact: see random_walk_many)
    # T^t from a truncated Chebyshev expansion, within tol * max|cam| of it on every element
    # (88 applications of T instead of 256 on a VOC grid); 0: T applied t times, literally.
    tol: float = 1e-5
    # The dense CRF (aff_labels.crf_* settings) on the walked maps before the argmax (the authors'
    # code refines only the CAMs with it).
    crf: bool = False


@dataclass
class RayConfig(JobConfig):
    enabled: bool = True            # label generation on Ray actors (false: in the calling process)
    address: Optional[str] = None   # None: start a local Ray instance
    num_cpus: int = 0               # CPUs of the local instance (0: all of this machine's)
    num_actors: int = 0             # 0: one per GPU, else one per CPU
    max_failures: float = 0.001     # share of samples allowed to fail before the stage exits non-zero
    dashboard: bool = False         # start Ray's dashboard on the head (local instance or job's head)
    dashboard_host: str = "127.0.0.1"   # where it listens: local only (all interfaces: anyone)
    # A shard whose task raised a transient error (OSError, CUDA OOM, RuntimeError) is tried again
    # up to shard_retries times, after retry_backoff_s, doubling; a corrupt shard is not retried
    shard_retries: int = 2
    retry_backoff_s: float = 2.0
    # With no shard waiting, an idle actor runs a copy of a shard running speculate_after times
    # longer than the median shard (per sample) and at least speculate_min_s; 0: never
    speculate_after: float = 3.0
    speculate_min_s: float = 30.0
    # The job of a Ray label stage (launcher local | slurm; see JobConfig): one Ray node per task
    gpus_per_node: int = 0
    tasks_per_node: Optional[int] = 1   # keep 1
    cpus_per_task: int = 8
    time_min: int = 240


@dataclass
class Config:
    name: str = "run"
    out_dir: str = "runs/demo"
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda
    data: DataConfig = field(default_factory=DataConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train_cls: TrainConfig = field(default_factory=TrainConfig)
    cams: CamConfig = field(default_factory=CamConfig)
    aff_labels: AffLabelConfig = field(default_factory=AffLabelConfig)
    train_aff: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=8, batch_size=8))
    random_walk: RandomWalkConfig = field(default_factory=RandomWalkConfig)
    train_seg: TrainConfig = field(default_factory=TrainConfig)
    seg_full: bool = False          # also train the fully supervised baseline (upper bound)
    ray: RayConfig = field(default_factory=RayConfig)
    # psa-dist submit: a step whose job fails is requeued (same job id, so the later steps' afterok
    # dependency still holds) this many times before the chain stops; 0: never
    submit_retries: int = 1


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
    for key, owner, unset in (("missing_class_frac", "train_seg", None),    # else ignored there
                              ("pair_border", "train_aff", "all")):
        for name in (n for n in ("train_cls", "train_aff", "train_seg") if n != owner):
            if getattr(getattr(cfg, name), key) != unset:
                raise ConfigError(f"{name}.{key}: only {owner} uses it")
    if cfg.train_aff.crop_size % cfg.model.aff_stride:
        raise ConfigError(f"train_aff.crop_size: must be a multiple of model.aff_stride "
                          f"({cfg.model.aff_stride}: its labels are cropped on whole cells), "
                          f"got {cfg.train_aff.crop_size}")
    if cfg.train_aff.pair_border not in ("all", "authors"):
        raise ConfigError(f"train_aff.pair_border: must be all or authors, got "
                          f"{cfg.train_aff.pair_border!r}")
    for name in ("train_cls", "train_aff", "train_seg"):
        t = getattr(cfg, name)
        if t.stop_patience is not None and t.stop_patience < 1:
            raise ConfigError(f"{name}.stop_patience: must be at least 1 or null, got "
                              f"{t.stop_patience}")
        if not 0 < t.stop_decay <= 1:
            raise ConfigError(f"{name}.stop_decay: must be in (0, 1], got {t.stop_decay}")
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
