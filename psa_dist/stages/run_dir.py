"""The run directory every stage reads and writes, and the facts of its dataset.

Layout of ``cfg.out_dir``::

    run_info.json                resolved config, versions, git commit
    stages/<stage>.json          written when a stage completes (its summary); its presence = done
                                 (for a stage after the CAMs: done by the config's method)
    stages/dataset.sha256        the dataset the stages were made from
    cls/ aff/ irn/ seg/ seg_full/    checkpoint.pth + log.jsonl of each model (table.MODELS)
    cams/ aff_labels/ random_walk/   one output shard per train shard (same keys, new field);
    ir_labels/ irn_walk/             method irn's
    report.json report.md panels/

A rerun skips every stage with a marker, resumes a trainer from its checkpoint, and redoes only the
label shards that are missing (shards are written atomically, so an existing one is complete).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from ..config import Config
from ..data.shards import output_path, read_dataset_json, split_shards
from ..data.synth import write_synth
from ..engine.trainer import BEST, CHECKPOINT, LOG
from ..util.atomic import atomic_write_json, atomic_write_text
from . import table


def ensure_dataset(cfg: Config) -> Path:
    """The dataset directory of the config; the synthetic one is generated when missing."""
    root = Path(cfg.data.root)
    if (root / "dataset.json").is_file():
        if cfg.data.source != "synth" or _synth_matches(root, cfg):
            return root
    if cfg.data.source != "synth":
        raise FileNotFoundError(f"data.root={root} has no dataset.json: convert the dataset first "
                                f"(psa-dist data convert-{cfg.data.source})")
    write_synth(cfg.synth, root, shard_size=cfg.data.shard_size, workers=cfg.data.workers,
                config=cfg)
    return root


def _synth_matches(root: Path, cfg: Config) -> bool:
    """Whether ``root`` holds the synthetic dataset of ``cfg.synth``; a generated dataset made
    with other settings (e.g. an older demo config) is removed so it is generated anew."""
    src = read_dataset_json(root).get("source", {})
    if src.get("kind") != "synth":
        raise FileExistsError(f"data.root={root} holds a dataset that is not synthetic "
                              f"({src.get('kind')!r}); set data.source or another data.root")
    want = json.loads(json.dumps(dataclasses.asdict(cfg.synth)))
    # a key newer than the dataset was generated at its default, which reproduces the data made
    # before the key existed byte for byte (tests/data/test_synth.py pins that)
    defaults = json.loads(json.dumps(dataclasses.asdict(type(cfg.synth)())))
    have = {**defaults, **(src.get("synth") or {})}
    diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if not diff:
        return True
    print(f"[data] {root} was generated with other synth settings ({', '.join(diff)}): "
          f"generating it anew", flush=True)
    shutil.rmtree(root)
    return False


def resolve_device(device: str) -> torch.device:
    """``device`` (auto | cpu | cuda | cuda:N) as this process will use it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def worker_device(device: str) -> torch.device:
    """The device a worker was given (``cuda`` on a Ray actor holding a GPU), or the CPU where
    this process sees no CUDA: Ray's GPUs can be logical (``ray start --num-gpus``), and a worker
    scheduled on one then computes on the CPU, as it would without Ray."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(device)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


class RunDir:
    """The paths of one run directory, every one of them: the outputs need no dataset to be named
    (a submitter, a resume check and the benchmarks have only the config)."""

    def __init__(self, out_dir):
        self.out = Path(out_dir)

    @property
    def stages(self) -> Path:
        """Markers, shard logs, eval parts, actors' logs, submitit folders."""
        return self.out / "stages"

    def marker(self, stage: str) -> Path:
        return self.stages / f"{stage}.json"

    def shard_log(self, name: str) -> Path:
        """One JSON line per shard a pool finished (``name``: a stage, or ``eval_<what>``)."""
        return self.stages / f"{name}.shards.jsonl"

    @property
    def actor_logs(self) -> Path:
        return self.stages / "logs"

    @property
    def submitit(self) -> Path:
        """The folders of the stages' submitit jobs (Ray clusters, the chain's steps)."""
        return self.stages / "submitit"

    @property
    def submitted(self) -> Path:
        """``psa-dist submit``'s record of the chain's job ids."""
        return self.stages / "submitted.json"

    @property
    def dataset_mark(self) -> Path:
        return self.stages / "dataset.sha256"

    def made_by_other_method(self, stage: str, method: str) -> bool:
        """Whether ``stage``'s marker was written under another method than ``method`` (the
        default method leaves none in its settings): its outputs belong to that method's pseudo
        labels. The stages every method shares (the classifier, the CAMs) serve any."""
        if table.shared(stage) or not self.marker(stage).is_file():
            return False
        recorded = json.loads(self.marker(stage).read_text()).get("settings", {})
        return recorded.get("method", "psa") != method

    def done_for(self, stage: str, method: str) -> bool:
        """Its marker is there, made by ``method`` where the stage depends on the method."""
        return self.marker(stage).is_file() and not self.made_by_other_method(stage, method)

    def eval_parts(self, what: str) -> Path:
        return self.stages / "eval_parts" / what

    def stage_dir(self, stage: str) -> Path:
        """The directory of a label stage's output shards."""
        return self.out / table.stage(stage).output

    def model_dir(self, model: str) -> Path:
        return self.out / table.MODELS[model].name

    def checkpoint(self, model: str) -> Path:
        return self.model_dir(model) / CHECKPOINT

    def train_log(self, model: str) -> Path:
        return self.model_dir(model) / LOG

    @property
    def bench(self) -> Path:
        return self.out / "bench"


class Run(RunDir):
    """Paths (:class:`RunDir`) and shared facts of one run directory: its config and dataset."""

    def __init__(self, cfg: Config, prepare: bool = True):
        """``prepare``: generate the synthetic dataset where it is missing (the driver's job; a
        worker only reads the dataset the driver made)."""
        super().__init__(cfg.out_dir)
        self.cfg = cfg
        self.root = ensure_dataset(cfg) if prepare else Path(cfg.data.root)
        self.info = read_dataset_json(self.root)
        self.num_classes = self.info["num_classes"]
        self.device = resolve_device(cfg.device)
        # paths under data.root, or URLs from data.shard_url (outputs stay local files)
        self.train_shards = split_shards(self.root, cfg.data.train_split, self.info,
                                         cfg.data.shard_url)
        self.num_train = self.info["splits"][cfg.data.train_split]["count"]
        old = self.out / "rw"        # the walk's directory before it took the stage's name
        new = self.stage_dir("random_walk")
        if prepare and old.is_dir() and not new.exists() and is_main_process():
            os.replace(old, new)

    # ---------------------------------------------------------------- outputs
    def label_shards(self, stage: str) -> list[Path]:
        """A label stage's output shard for each train shard, in order."""
        return [output_path(self.stage_dir(stage), s) for s in self.train_shards]

    def shard_counts(self) -> dict[str, int]:
        """Samples per train shard, keyed by the shard's path or URL."""
        return {str(url): s["count"] for url, s in
                zip(self.train_shards, self.info["splits"][self.cfg.data.train_split]["shards"])}

    # ---------------------------------------------------------------- markers
    def done(self, stage: str) -> bool:
        """Its marker is there, and (a stage that depends on the method) made by this method."""
        return self.done_for(stage, self.cfg.method)

    def of_other_method(self, stage: str) -> bool:
        return self.made_by_other_method(stage, self.cfg.method)

    def summary(self, stage: str) -> dict:
        return json.loads(self.marker(stage).read_text())

    def finish(self, stage: str, summary: dict) -> None:
        if is_main_process():   # under torchrun every rank runs the stage; one marks it done
            atomic_write_json(self.marker(stage),
                              {**summary, "settings": table.settings(self.cfg, stage)})
            # eval and report read every earlier stage's outputs: a stage (re)done after them
            # (say train-seg run after eval) makes them stale, so they run again
            for later in table.stale_after(stage):
                self.marker(later).unlink(missing_ok=True)

    def clear_outputs(self, stage: str) -> list[str]:
        """Remove what ``stage`` wrote (a trainer's checkpoints, logs and curves; a label stage's
        shards and shard log) so that it runs anew; the paths removed."""
        s = table.stage(stage)
        paths = []
        if s.kind == "train":
            for model in s.models:
                d = self.model_dir(model)
                paths += [d / n for n in (CHECKPOINT, BEST, LOG, "tensorboard")]
        elif s.kind == "labels":
            d = self.stage_dir(stage)
            paths += sorted(d.glob("*.tar")) if d.is_dir() else []
            paths.append(self.shard_log(stage))
        removed = []
        for p in paths:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
            else:
                continue
            removed.append(str(p.relative_to(self.out)))
        if s.kind == "labels" and len(removed) > 3:
            removed = [f"{len(removed) - 1} shards of {s.output}/", *removed[-1:]]
        return removed

    def changed_since_done(self, stages: list[str]) -> dict[str, list[str]]:
        """For each done stage of ``stages`` whose marker recorded other settings than the
        config's now: the keys that differ (markers from before settings were recorded: none)."""
        out = {}
        for name in stages:
            if self.done(name):
                recorded = self.summary(name).get("settings")
                if recorded is not None:
                    diff = table.changed_settings(recorded, table.settings(self.cfg, name))
                    if diff:
                        out[name] = diff
        return out

    def check_same_dataset(self, force: bool) -> None:
        """A run directory belongs to one dataset: cached stages made from another one (say, the
        synthetic data generated anew with other settings) must not be reused silently."""
        digest = hashlib.sha256((self.root / "dataset.json").read_bytes()).hexdigest()
        mark = self.dataset_mark
        if mark.is_file() and mark.read_text().strip() != digest and not force:
            raise FileExistsError(f"{self.out} holds stages made from another dataset than "
                                  f"{self.root} (dataset.json changed): use a new out_dir, or "
                                  f"--force")
        if is_main_process():
            atomic_write_text(mark, digest + "\n")
