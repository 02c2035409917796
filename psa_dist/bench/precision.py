"""`psa-dist bench precision`: which precision a config's networks get on this machine's CPU, and
why: each trainer's step (forward and backward at its batch and crop) and the CAM stage's forward,
timed in float32 and under bf16 autocast as the trainers and the CAM workers time them
(``util/precision.py``), with the decision each gets. What a user runs first on a new kind of
machine: a CPU whose flags promise bf16 may still run it slower than float32.

The networks have random weights (the timing does not depend on them) and no pretrained weights
are read. By default the cache (``$PSA_DIST_CACHE/precision.json``) is used as the stages use it;
``--fresh`` times again and rewrites it.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config import Config, ConfigError
from ..data.shards import read_dataset_json
from ..stages import table
from ..stages.label_stages.cams import timing_shape
from ..util.atomic import atomic_write_json
from ..util.dist import cpu_threads
from ..util.precision import choose_for_model, cpu_has_native_bf16, cpu_tag_line, time_pass



def timed_models(cfg: Config) -> list[str]:
    """The models ``cfg.method`` trains, one per architecture (the segmenters share one: one
    timing, one cache entry)."""
    models = [m for s in table.stages_of(cfg) for m in table.stage(s).models]
    return list({table.kind(m).timing_key: m for m in reversed(models)}.values())[::-1]


def config_classes(cfg: Config) -> int:
    """The classes a config's networks have: its dataset's (``dataset.json`` under data.root),
    else the synthetic data's count; a real dataset not converted yet is named."""
    if (Path(cfg.data.root) / "dataset.json").is_file():
        return read_dataset_json(cfg.data.root)["num_classes"]
    if cfg.data.source == "synth":
        return cfg.synth.num_classes
    raise ConfigError(f"data.root: no dataset.json in {cfg.data.root} to read the classes from; "
                      f"convert the dataset first, or give --classes")


def bench_precision(cfg: Config, num_classes: int, threads: int | None = None,
                    fresh: bool = False, out=None) -> list[dict]:
    """One row per network and pass: its shape, threads, float32 and bf16 seconds, the decision.
    Each case runs on the threads its stage would take (a trainer rank alone on this machine:
    ``util.dist.cpu_threads``; a CAM worker: 1 on a Ray actor, else this process's), or
    ``threads``; the cache's entries are per thread count."""
    print(f"[bench precision] {cpu_tag_line()}, native bf16 flag: {cpu_has_native_bf16()}, "
          f"torch {torch.__version__}", flush=True)
    cases = []
    for model in timed_models(cfg):
        section = table.MODELS[model].section
        t = getattr(cfg, section)
        cases.append((model, f"{section}.amp", t.amp, (t.batch_size, 3, t.crop_size, t.crop_size),
                      True, threads or cpu_threads(t.num_workers, t.threads)))
    cases.append(("cams", "cams.amp", cfg.cams.amp, timing_shape(cfg), False,
                  threads or (1 if cfg.ray.enabled else torch.get_num_threads())))
    rows, threads_before = [], torch.get_num_threads()
    try:
        rows = [_case(cfg, num_classes, fresh, *case) for case in cases]
    finally:
        torch.set_num_threads(threads_before)
    print(format_table(rows), flush=True)
    if out is not None:
        atomic_write_json(Path(out), {"bench": "precision", "cpu": cpu_tag_line(),
                                      "native_bf16_flag": cpu_has_native_bf16(),
                                      "torch": torch.__version__, "rows": rows})
        print(f"[bench precision] wrote {out}", flush=True)
    return rows


def _case(cfg: Config, num_classes: int, fresh: bool, name: str, field: str, amp: str,
          shape: tuple, train: bool, n_threads: int) -> dict:
    """One network's pass timed (or read from the cache) on ``n_threads`` threads."""
    torch.set_num_threads(n_threads)
    if train:       # as model_to_train leaves it: the config's frozen layers, its BN mode
        kind = table.kind(name)
        net, key = kind.timed_network(cfg, num_classes), kind.timing_key
        if getattr(cfg, table.MODELS[name].section).channels_last:
            net.to(memory_format=torch.channels_last)
    else:           # a label stage's forward, of the model it loads
        model = table.stage(name).uses_models[0]
        net, key = table.kind(model).architecture(cfg, num_classes).eval(), name
    t0 = time.monotonic()
    p = choose_for_model(amp, "cpu", field, net, shape, train=train, key=key, refresh=fresh)
    speedup = round(p.float32_s / p.bf16_s, 2) if p.float32_s and p.bf16_s else None
    seconds = round(time.monotonic() - t0, 1)      # what the choice cost
    # crops/s at the precision chosen, the pass as timed: a trainer's images/s without its loader
    # and logging (its log shows somewhat less); for the CAM stage one scale of its several, no
    # flip. For comparing machines, not for the stage's own rate
    step_s = p.bf16_s if p.dtype is torch.bfloat16 else p.float32_s
    if step_s is None:          # nothing timed (no native bf16, or bf16! / none asked for)
        step_s = time_pass(net, shape, train, p.dtype)
    row = {"network": name, "pass": "train step" if train else "forward", "shape": list(shape),
           "threads": n_threads, "setting": f"{field}={amp}", "float32_s": p.float32_s,
           "bf16_s": p.bf16_s, "bf16_speedup": speedup, "precision": p.name, "cached": p.cached,
           "crops_per_s": round(shape[0] / step_s, 1), "reason": p.reason, "seconds": seconds}
    print(f"[bench precision] {name} {row['pass']} {tuple(shape)}, {n_threads} thread(s): "
          f"{p.describe()}", flush=True)
    return row


def format_table(rows: list[dict]) -> str:
    head = ("| network | pass | batch x 3 x H x W | threads | float32 ms | bf16 ms | "
            "bf16 speed-up | precision | crops/s |\n|---|---|---|---|---|---|---|---|---|\n")

    def ms(s):
        return "-" if s is None else f"{1000 * s:.0f}"
    return head + "".join(
        f"| {r['network']} | {r['pass']} | {' x '.join(map(str, r['shape']))} | {r['threads']} | "
        f"{ms(r['float32_s'])} | {ms(r['bf16_s'])} | {r['bf16_speedup'] or '-'} | "
        f"{r['precision']} | {r['crops_per_s']} |\n" for r in rows)
