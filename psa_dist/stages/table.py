"""The stage table: every fact about a stage written once. The run order, the CLI subcommands, the
chained SLURM jobs, the output directories, the stale-marker rule and the check before a run
(:func:`unmet_needs`) are all read from here.

A stage has one name everywhere (marker ``stages/<name>.json``, ``psa-dist <name with dashes>``,
job ``psa-<run>-<step>``); a model has one name too (``cls``, ``aff``, ``seg``, ``seg_full``: the
directory of its checkpoint and log, and its trainer's ``[name]`` in the logs).

The rows hold facts; behaviour is in the modules they name (``"module:attribute"``): a label
stage's in ``label_stages/<name>.py`` (:func:`label_stage`), a model's in ``kinds/`` (:func:`kind`).
They are imported when first asked for, so that reading the table (``psa-dist --help`` builds its
parser from it) imports no torch. A new stage is its module and one row (:func:`add_stage` adds a
row from outside, as the toy stage of the tests does).
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
from dataclasses import dataclass
from typing import Callable

from ..config import METHODS, Config, JobConfig, TrainConfig


@dataclass(frozen=True)
class Model:
    name: str           # its directory under out_dir (checkpoint.pth, log.jsonl)
    section: str        # the config section of its trainer
    stage: str          # the stage that trains it
    labels_from: str | None   # the label stage whose shards it trains on (None: the dataset's)
    kind: str           # its behaviour: "module:attribute" of a ModelKind (kinds/)


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str           # train | labels | eval | report
    help: str
    section: str | None = None          # its config section
    output: str | None = None           # label stages: the directory of its output shards
    models: tuple = ()                  # train stages: the models it trains
    uses_models: tuple = ()             # checkpoints of earlier stages it loads
    needs: tuple = ()                   # earlier stages whose outputs it reads
    extras: Callable[[Config], list] = lambda cfg: []   # [(python module, pip extra, setting)]
    step: str = ""                      # the chained SLURM job it runs in (default: its CLI name)
    reads_all: bool = False             # reads every earlier stage: stale when one is redone
    module: str = ""                    # label stages: "module:attribute" of its LabelStage
    export: str = ""                    # label stages: its name for `psa-dist export --what`
    methods: tuple = METHODS            # the methods (config key method) it is a stage of

    @property
    def cli(self) -> str:
        return self.name.replace("_", "-")

    @property
    def job(self) -> str:
        return self.step or self.cli


def _crf(setting: str, on: Callable[[Config], bool]):
    return lambda cfg: [("pydensecrf", "crf", f"{setting}=true")] if on(cfg) else []


def _tensorboard(section: str):
    return lambda cfg: ([("tensorboard", "tensorboard", f"{section}.tensorboard=true")]
                        if getattr(cfg, section).tensorboard else [])


_LABELS, _KINDS = f"{__package__}.label_stages", f"{__package__}.kinds"
# stand for the method's own stage in needs and labels_from (resolved by method_stage): the label
# stage that writes the pseudo labels, and the one that writes the labels its model learns from
PSEUDO, RELATIONS = "<pseudo labels>", "<relation labels>"
ROLES = {"psa": {PSEUDO: "random_walk", RELATIONS: "aff_labels"},
         "irn": {PSEUDO: "irn_walk", RELATIONS: "ir_labels"}}
STAGES: list[Stage] = [
    Stage("train_cls", "train", "train the classifier on image-level labels",
          section="train_cls", extras=_tensorboard("train_cls"), models=("cls",)),
    Stage("cams", "labels", "multi-scale CAMs of the train split (shards in out_dir/cams)",
          section="cams", output="cams", uses_models=("cls",), needs=("train_cls",),
          module=f"{_LABELS}.cams:STAGE", export="cams"),
    # method psa: AffinityNet
    Stage("aff_labels", "labels",
          "confident-region affinity labels from the CAMs (out_dir/aff_labels)",
          section="aff_labels", output="aff_labels", needs=("cams",),
          extras=_crf("aff_labels.crf", lambda c: c.aff_labels.crf),
          module=f"{_LABELS}.aff_labels:STAGE", export="aff_labels", methods=("psa",)),
    Stage("train_aff", "train", "train AffinityNet on the affinity labels",
          section="train_aff", extras=_tensorboard("train_aff"), models=("aff",),
          uses_models=("cls",), needs=("train_cls", "aff_labels"), methods=("psa",)),
    Stage("random_walk", "labels",
          "random-walk pseudo labels from CAMs and AffinityNet (out_dir/random_walk)",
          section="random_walk", output="random_walk", uses_models=("aff",),
          needs=("cams", "train_aff"),
          extras=_crf("random_walk.crf", lambda c: c.random_walk.crf),
          module=f"{_LABELS}.random_walk:STAGE", export="pseudo", methods=("psa",)),
    # method irn: IRN's inter-pixel relations (its semantic path)
    Stage("ir_labels", "labels",
          "method irn: inter-pixel relation labels from the CAMs (out_dir/ir_labels)",
          section="ir_labels", output="ir_labels", needs=("cams",),
          extras=_crf("ir_labels.crf", lambda c: c.ir_labels.crf),
          module=f"{_LABELS}.ir_labels:STAGE", export="ir_labels", methods=("irn",)),
    Stage("train_irn", "train", "method irn: train IRN's class-boundary branch on the relations",
          section="train_irn", extras=_tensorboard("train_irn"), models=("irn",),
          uses_models=("cls",), needs=("train_cls", "ir_labels"), methods=("irn",)),
    Stage("irn_walk", "labels",
          "method irn: pseudo labels from the CAMs walked on IRN's boundaries (out_dir/irn_walk)",
          section="irn_walk", output="irn_walk", uses_models=("irn",), needs=("cams", "train_irn"),
          extras=_crf("irn_walk.crf", lambda c: c.irn_walk.crf),
          module=f"{_LABELS}.irn_walk:STAGE", export="pseudo", methods=("irn",)),
    Stage("train_seg", "train",
          "train the segmenter on the pseudo labels (and on ground truth if seg_full)",
          section="train_seg", extras=_tensorboard("train_seg"), models=("seg", "seg_full"),
          needs=(PSEUDO,)),
    Stage("eval", "eval", "mIoU of CAMs, pseudo labels (train) and segmenters (val)",
          needs=("cams", RELATIONS, PSEUDO), step="eval-report", reads_all=True),
    Stage("report", "report", "write report.json, report.md and sample panels",
          needs=("eval",), step="eval-report", reads_all=True),
]
BY_NAME: dict[str, Stage] = {}
ORDER: list[str] = []
LABEL_STAGES: list[str] = []

MODELS = {m.name: m for m in (
    Model("cls", "train_cls", "train_cls", None, f"{_KINDS}.classifier:KIND"),
    Model("aff", "train_aff", "train_aff", "aff_labels", f"{_KINDS}.affinity_net:KIND"),
    Model("irn", "train_irn", "train_irn", "ir_labels", f"{_KINDS}.boundary_net:KIND"),
    Model("seg", "train_seg", "train_seg", PSEUDO, f"{_KINDS}.segmenter:SEG"),
    # the ground truth: the upper bound
    Model("seg_full", "train_seg", "train_seg", None, f"{_KINDS}.segmenter:SEG_FULL"),
)}


def _index() -> None:
    """The views of STAGES, rebuilt in place (so that every reference to them sees a new row)."""
    BY_NAME.clear()
    BY_NAME.update((s.name, s) for s in STAGES)
    ORDER[:] = [s.name for s in STAGES]
    LABEL_STAGES[:] = [s.name for s in STAGES if s.kind == "labels"]


_index()


def add_stage(row: Stage, after: str) -> None:
    """Add a stage's row after stage ``after`` (a stage from outside the package: its module and
    this row are all it needs). It lives in this process's table: the Ray actors get the row
    itself, but a stage that runs in a submitted job of its own (``ray.launcher: local | slurm``)
    rebuilds the table there, so such a stage belongs in ``STAGES``."""
    if row.name in BY_NAME:
        raise ValueError(f"stage {row.name!r} is in the table already")
    STAGES.insert(ORDER.index(stage(after).name) + 1, row)
    _index()


def remove_stage(name: str) -> None:
    STAGES.remove(stage(name))
    _index()


PRED = "pred"   # export: the trained segmenter's prediction, the one export not of a label stage


def exports(cfg: Config | None = None) -> dict:
    """``psa-dist export --what`` -> the stage of ``cfg.method`` whose outputs it writes (without
    ``cfg``: every name, the command line's choices)."""
    rows = [s for s in STAGES if s.export and (cfg is None or cfg.method in s.methods)]
    return {**{s.export: s.name for s in rows}, PRED: MODELS["seg"].stage}


def resolve(ref: str):
    """The object a row names (``"module:attribute"``), its module imported on first use."""
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def label_stage(name: str):
    """The behaviour of label stage ``name`` (a ``label_stages.base.LabelStage``)."""
    row = stage(name)
    if not row.module:
        raise ValueError(f"stage {name!r} is not a label stage")
    return resolve(row.module)


def kind(model: str):
    """The behaviour of model ``model`` (a ``kinds.base.ModelKind``)."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r} (have {', '.join(MODELS)})")
    return resolve(MODELS[model].kind)


def stage(name: str) -> Stage:
    if name not in BY_NAME:
        raise ValueError(f"unknown stage {name!r} (have {', '.join(ORDER)})")
    return BY_NAME[name]


def method_stage(cfg: Config, name: str) -> str:
    """``name``, or the stage of ``cfg.method`` that a role (``PSEUDO``, ``RELATIONS``) stands for."""
    return ROLES[cfg.method].get(name, name)


def stages_of(cfg: Config) -> list[str]:
    """The stages ``cfg.method`` runs, in order."""
    return [s.name for s in STAGES if cfg.method in s.methods]


def needs_of(cfg: Config, name: str) -> list[str]:
    return [method_stage(cfg, n) for n in stage(name).needs]


def labels_of(cfg: Config, model: str) -> str | None:
    """The label stage whose shards ``model`` trains on under ``cfg`` (None: the dataset's)."""
    ref = MODELS[model].labels_from
    return None if ref is None else method_stage(cfg, ref)


def shared(name: str) -> bool:
    """Whether ``name`` and every stage before it are the same in every method (their outputs
    serve any method: switching methods keeps the classifier and the CAMs)."""
    return all(set(s.methods) == set(METHODS) for s in STAGES[:ORDER.index(name) + 1])


def models_trained(cfg: Config, name: str) -> list[str]:
    """The models a train stage trains under ``cfg`` (the segmenter's upper bound if seg_full)."""
    return [m for m in stage(name).models if m != "seg_full" or cfg.seg_full]


def train_config(cfg: Config, model: str) -> TrainConfig:
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r} (have {', '.join(MODELS)})")
    return getattr(cfg, MODELS[model].section)


def stale_after(name: str) -> list[str]:
    """Stages whose markers a (re)done ``name`` makes stale: the later ones that read every
    earlier stage's outputs (eval and report)."""
    later = ORDER[ORDER.index(name) + 1:]
    return [s for s in later if BY_NAME[s].reads_all]


def chain_steps(cfg: Config) -> list[tuple[str, list[str]]]:
    """The chained SLURM jobs of ``cfg.method`` in order: (job name, the stages it runs)."""
    steps: list[tuple[str, list[str]]] = []
    for s in (BY_NAME[n] for n in stages_of(cfg)):
        if steps and steps[-1][0] == s.job:
            steps[-1][1].append(s.name)
        else:
            steps.append((s.job, [s.name]))
    return steps


def unmet_needs(cfg: Config, to_run: list[str], done: Callable[[str], bool]) -> list[str]:
    """What keeps the stages ``to_run`` (in order) from running through, checked before the first
    one starts: each stage's earlier stages must be done or run before it, and the optional
    packages its settings need must be installed. One line per problem, saying how to fix it."""
    problems, scheduled = [], set()
    for name in to_run:
        s = stage(name)
        if cfg.method not in s.methods:
            problems.append(f"{name} is a stage of method {' or '.join(s.methods)}, and the "
                            f"config says method={cfg.method}: set method={s.methods[0]}")
        for need in needs_of(cfg, name):
            if need not in scheduled and not done(need):
                problems.append(f"{name} needs the outputs of {need}, which is not done: run "
                                f"`psa-dist {BY_NAME[need].cli} CONFIG` (or the whole pipeline) "
                                f"first")
        for module, extra, setting in s.extras(cfg):
            if importlib.util.find_spec(module) is None:
                problems.append(f"{name}: {setting} needs the {module} module, which is not "
                                f"installed: pip install 'psa-dist[{extra}]', or set "
                                f"{setting.split('=')[0]}=false")
        scheduled.add(name)
        for model in s.models:
            problems += [p for p in kind(model).problems(cfg) if p not in problems]
    return problems


# Keys that say where and how fast a stage runs, not what it computes: left out of its settings
_RUN_ONLY = {f.name for f in dataclasses.fields(JobConfig)} | {
    "num_workers", "threads", "log_every", "checkpoint_every", "tensorboard", "channels_last"}


# Keys added after runs were made, with the value every run had before them: recorded only when set
# to something else, so that a marker written before the key existed still matches (a new key
# would otherwise mark every cached stage as made with other settings, and refuse a half-trained
# model's resume). irn_walk's CRF kernels count only with its CRF on.
_ADDED_LATER = {"optimizer": "sgd", "warmup_epochs": 0.0}


def settings(cfg: Config, name: str) -> dict:
    """What decides stage ``name``'s outputs under ``cfg``, as dotted keys: the seed, the
    synthetic data's settings, the model, and the sections of this stage and every earlier one
    (a label stage's inference batch and every job or logging key left out). Recorded in the
    stage's marker, so that a rerun with other settings can say which cached stages they concern."""
    flat = {"seed": cfg.seed, "seg_full": cfg.seg_full}
    if cfg.method != "psa" and not shared(name):    # the default method adds no key (older runs)
        flat["method"] = cfg.method
    sections = ["model"] + (["synth"] if cfg.data.source == "synth" else [])
    sections += [s.section for s in STAGES[:ORDER.index(name) + 1]
                 if s.section and cfg.method in s.methods]
    for sec in sections:
        for key, value in dataclasses.asdict(getattr(cfg, sec)).items():
            if key in _RUN_ONLY or (key == "batch_size" and sec in LABEL_STAGES):
                continue
            if sec == "model" and key.startswith("irn_") and (cfg.method != "irn"
                                                             or shared(name)):
                continue        # IRN's keys: not part of what the other stages compute
            flat[f"{sec}.{key}"] = json.loads(json.dumps(value))    # tuples as lists, as stored
    return _comparable(flat)


def _comparable(flat: dict) -> dict:
    """Settings without the keys added later at their old value, and without irn_walk's CRF keys
    while its CRF is off: what a marker records, and what two markers are compared on (markers
    of a while recorded irn_walk's CRF keys with the CRF off)."""
    def dropped(key: str, value) -> bool:
        sec, _, field = key.partition(".")
        if sec.startswith("train_") and field in _ADDED_LATER:
            return value == _ADDED_LATER[field]
        return sec == "irn_walk" and field.startswith("crf") and not flat.get("irn_walk.crf")
    return {k: v for k, v in flat.items() if not dropped(k, v)}


def changed_settings(recorded: dict, now: dict) -> list[str]:
    """The keys whose value differs between a marker's settings and the current ones."""
    recorded, now = _comparable(recorded), _comparable(now)
    return sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))
