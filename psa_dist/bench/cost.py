"""`psa-dist bench cost`: what one image costs at real size in each stage, and what a dataset would.

Per stage of the pipeline, on a VOC-sized image (500x375, ``configs/voc_resnet38.yaml``: ResNet-38)
and a COCO-sized one (640x480, ``configs/coco_resnet50.yaml``: ResNet-50), with randomly
initialised networks (speed does not depend on the weights; ``model.pretrained`` is overridden):
seconds per image (the median of ``--images`` repeats after a warm-up at a quarter of the size),
the peak memory the stage added (CPU: the process's peak RSS, ``VmHWM``, minus its RSS before the
model was built; CUDA: ``torch.cuda.max_memory_allocated``) and the bytes of its output (the shard
sample the stage writes, encoded by ``data/shards.py``; a trainer's is its checkpoint, once per
run). Each case runs in a fresh subprocess so that its peak memory is its own, in float32 and
under bf16 autocast (forced on, whatever ``util/precision.py`` would pick for this CPU) for the
stages that have a precision setting. The label stages are the stages' own per-shard functions
(``cam_shard``, ``aff_label_shard``, ``rw_shard``) on a one-image shard; the trainers are one
``train_step`` of the engine on crops of the config's size.

From the per-image figures, ``cost_report.extrapolate`` gives the time of VOC train_aug and COCO
train on 8, 32 and 128 GPUs and the storage of every stage's outputs, each assumption written
beside the figures (``cost_report.ASSUMPTIONS``). The bounds measure what may not fit: the walk at
stride 4 on the 640-px image, ResNet-38 at scale 2.0 of the 500-px image, each projected to the
config's batch.
"""
from __future__ import annotations

import dataclasses
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from ..config import SynthConfig, load_config
from ..core.crf import crf_available
from ..core.image import normalize
from ..data.shards import encode_image, encode_json, encode_mask, encode_npy, iter_shard, write_shard
from ..data.synth import render
from ..engine.loop import train_step
from ..nets.optim import build_optimizer, build_poly_scheduler
from ..stages import table
from ..stages.label_stages.base import ShardContext
from ..util.atomic import atomic_write_bytes, atomic_write_json
from ..util.precision import AMP_DTYPES, amp_dtype
from ..util.runinfo import write_run_info
from .cases import AMP_STAGES, BOUNDS, DATASETS
from .cost_report import (GPU_TFLOPS, LIMIT_GIB, STAGES, TRAIN, at_batch, cpu_only, extrapolate,
                          tables)

_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# ----------------------------------------------------------------------------- one case (subprocess)
def dataset_config(name: str, overrides=()):
    """The dataset's config with its weight files switched off (they are absent) and overrides."""
    return load_config(_CONFIGS / DATASETS[name]["config"],
                       ["model.pretrained=null", "model.seg_pretrained=null", *overrides])


def _size(ds: dict, scale: float) -> tuple[int, int]:
    return tuple(max(16, round(v * scale)) for v in ds["size"])


def _scene(h: int, w: int, seed: int):
    """A synthetic scene (image, object mask) of h x w: smooth background, objects, noise."""
    image, mask, _ = render(SynthConfig(image_size=max(h, w), seed=seed), "train", 0)
    return np.ascontiguousarray(image[:h, :w]), np.ascontiguousarray(mask[:h, :w])


def _labels(mask: np.ndarray, present) -> torch.Tensor:
    """Object pixels labelled with the dataset's classes in turn, background 0."""
    lut = torch.tensor([0] + [present[(v - 1) % len(present)] for v in range(1, 256)])
    return lut[torch.from_numpy(mask).long()]


def _cams(mask: np.ndarray, present) -> np.ndarray:
    """CAM-like maps in [0, 1] (K, H, W) for the K present classes: blurred object masks."""
    lab = _labels(mask, present)
    maps = torch.stack([(lab == c).float() for c in present])[None]
    maps = F.avg_pool2d(maps, 31, 1, 15, count_include_pad=False)[0]
    return (maps / maps.amax(dim=(-2, -1), keepdim=True).clamp(min=1e-5)).numpy()


def _sync(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _mem(device, peak: bool) -> float:
    """MB: the peak (or current) RSS of this process, or CUDA's peak (or current) allocation."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**20
    field = "VmHWM:" if peak else "VmRSS:"
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) / 1024 for x in f if x.startswith(field))


def _weights_mb(model) -> tuple[float, float]:
    """(weights and buffers, trainable parameters) in MB."""
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    train = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return total / 2**20, train / 2**20


def _sample_bytes(shard: Path) -> tuple[int, int]:
    """(encoded field bytes, tar bytes) of the first sample of a shard."""
    sample = next(iter(iter_shard(shard)))
    sizes = [len(v) for k, v in sample.items() if not k.startswith("__")]
    return sum(sizes), sum(512 + -(-n // 512) * 512 for n in sizes)


def _trainer(cfg, ds, stage, device, dtype, batch):
    model_name = TRAIN[stage]
    kind = table.kind(model_name)
    tcfg = getattr(cfg, stage)
    batch = batch or tcfg.batch_size      # 0: the config's batch per rank (the GPU default)
    model = kind.timed_network(cfg, ds["classes"]).to(device)
    if not cfg.model.freeze_bn:
        batch = max(batch, kind.min_train_batch)
    opt = build_optimizer(model, tcfg.lr, tcfg.weight_decay, tcfg.momentum, model.new_modules(),
                          kind=tcfg.optimizer)
    sched = build_poly_scheduler(opt, 10**6)
    moments = 2 if tcfg.optimizer == "adamw" else 1     # AdamW's two moments, SGD's momentum
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    loss = kind.losses(cfg, tcfg)(False)
    weights, trainable = _weights_mb(model)

    def once(image, mask, scale, tmp):
        crop = max(32, round(tcfg.crop_size * scale))
        x = F.interpolate(normalize(torch.from_numpy(image)[None]), size=(crop, crop),
                          mode="bilinear", align_corners=False).repeat(batch, 1, 1, 1)

        def label_at(size):
            return F.interpolate(_labels(mask, ds["present"])[None, None].float(), size=size,
                                 mode="nearest")[0, 0].long()
        y = kind.example_target(label_at, ds["present"], ds["classes"], crop, batch, cfg)
        x, y = x.to(device), y.to(device)
        t0 = _sync(device)
        train_step(model, loss, x, y, opt, sched, scaler, dtype)
        return (_sync(device) - t0) / batch

    def output(tmp):
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buf)
        return buf.tell(), buf.tell()

    return once, output, {"batch": batch, "config_batch": tcfg.batch_size, "weights_mb": weights,
                          "fixed_mb": weights + (1 + moments) * trainable, "per": "run (checkpoint)"}


def _label_stage(cfg, ds, stage, device, dtype, batch):
    label_stage = table.label_stage(stage)
    uses = table.stage(stage).uses_models
    model = (table.kind(uses[0]).architecture(cfg, ds["classes"]).to(device).eval() if uses
             else None)
    ctx = ShardContext(cfg, ds["classes"], device, model, dtype, crf=crf_available())
    weights = _weights_mb(model)[0] if model is not None else 0.0
    last = {}

    def once(image, mask, scale, tmp):
        key = f"img{len(last)}"
        write_shard(tmp / "in.tar", [{"__key__": key, "jpg": encode_image(image),
                                      "cls.json": encode_json(ds["present"])}])
        write_shard(tmp / "cams.tar", [{"__key__": key, "cls.json": encode_json(ds["present"]),
                                        "cam.npy": encode_npy(_cams(mask, ds["present"]))}])
        out = tmp / f"{stage}{len(last)}.tar"
        inputs = [tmp / f"{name}.tar" for name in label_stage.reads]   # what it reads: the CAMs
        t0 = _sync(device)
        label_stage.process(ctx, tmp / "in.tar", inputs, out, batch_size=1)
        seconds = _sync(device) - t0
        last["out"] = out
        return seconds

    def output(tmp):
        return _sample_bytes(last["out"])

    return once, output, {"batch": 1, "config_batch": label_stage.config_batch(cfg),
                          "weights_mb": weights, "fixed_mb": weights, "per": "image",
                          "note": label_stage.cost_note(ctx)}


def run_case(spec: dict) -> dict:
    """One stage of one dataset at one precision on one device, in this process."""
    device = torch.device(spec["device"])
    cfg = load_config(spec["config"], spec.get("overrides", ()))
    ds = DATASETS[spec["dataset"]]
    dtype = AMP_DTYPES["bf16"] if spec["precision"] == "bf16" else None
    scale = spec.get("size_scale", 1.0) * spec.get("cut", 1.0)    # of images and crops
    h, w = _size(ds, scale)
    scenes = [_scene(h, w, seed) for seed in range(spec.get("images", 1))]
    warm = _scene(max(16, h // 4), max(16, w // 4), 99)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = _mem(device, peak=False)
    make = _trainer if spec["stage"] in TRAIN else _label_stage
    with tempfile.TemporaryDirectory() as tmp:
        once, output, info = make(cfg, ds, spec["stage"], device, dtype, spec.get("batch", 1))
        once(*warm, 0.25 * scale, Path(tmp))
        seconds = []
        for i, (image, mask) in enumerate(scenes):
            seconds.append(once(image, mask, scale, Path(tmp)))
            print(f"[bench cost]   {spec['dataset']} {spec['stage']} {spec['precision']} "
                  f"{device.type}: image {i + 1}/{len(scenes)} {seconds[-1]:.2f} s", file=sys.stderr,
                  flush=True)
        peak = _mem(device, peak=True) - base
        # CUDA: what the caching allocator held too (what the GPU must have free; the CUDA
        # context itself, a few hundred MB, is in neither figure)
        reserved = torch.cuda.max_memory_reserved() / 2**20 if device.type == "cuda" else None
        out_bytes, tar_bytes = output(Path(tmp))
    return {**{k: spec[k] for k in ("dataset", "stage", "precision", "device")},
            "cut": spec.get("cut", 1.0),
            "size": [h, w], "seconds": statistics.median(seconds), "seconds_all": seconds,
            "peak_mb": round(peak, 1),
            **({"reserved_mb": round(reserved, 1)} if reserved is not None else {}),
            "output_bytes": out_bytes, "tar_bytes": tar_bytes,
            "threads": torch.get_num_threads(),
            **{k: round(v, 1) if isinstance(v, float) else v for k, v in info.items()}}


def _subprocess(spec: dict) -> dict:
    code = ("import json,sys; from psa_dist.bench.cost import run_case; "
            "print(json.dumps(run_case(json.loads(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], stdout=subprocess.PIPE,
                          text=True)
    if proc.returncode != 0:
        why = "killed: out of memory?" if proc.returncode in (-9, 137) else "its error is above"
        return {**spec, "error": f"exit {proc.returncode} ({why})"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the bench
def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    with open("/proc/cpuinfo") as f:
        model = next((x.split(":", 1)[1].strip() for x in f if x.startswith("model name")), "?")
    return f"{model}, {torch.get_num_threads()} threads"


def _what(cfg, stage: str, size, scale: float = 1.0) -> str:
    if stage in TRAIN:
        net = table.kind(TRAIN[stage]).describe(cfg)
        return f"{net}, train step, crop {max(32, round(getattr(cfg, stage).crop_size * scale))}"
    return table.label_stage(stage).describe(cfg, size)


def cpu_conv_gflops(repeats: int = 3) -> float:
    """This CPU's float32 throughput on a ResNet-like convolution (3x3, 256 -> 256 channels,
    56x56, batch 4), GFLOP/s with this process's threads: what the assumed GPU speed is divided
    by, so that the extrapolation does not depend on the CPU that measured the stages."""
    conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False)
    x = torch.randn(4, 256, 56, 56)
    flops = 2 * 4 * 256 * 256 * 9 * 56 * 56
    with torch.no_grad():
        conv(x)                                   # warm-up: oneDNN picks its kernel here
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            conv(x)
            times.append(time.perf_counter() - t0)
    return flops / statistics.median(times) / 1e9


def _cases(out: Path, devices, datasets, stages, amps, images, batch, size_scale, bf16_cut,
           bounds) -> tuple[list, list]:
    """The cases (one stage of one dataset at one precision on one device) and the bounds' cases."""
    common = {"images": images, "size_scale": size_scale}

    def batch_on(dev: str) -> int:
        return batch if batch is not None else (1 if dev == "cpu" else 0)

    cases = [{**common, "batch": batch_on(dev), "dataset": d, "stage": s, "precision": p,
              "device": dev, "overrides": [], "config": str(out / f"config_{d}.yaml")}
             for dev in devices for d in datasets for s in stages
             for p in (amps if s in AMP_STAGES else ["float32"])
             if not (dev == "cuda" and cpu_only(s))]      # the CRF runs on the CPU anyway
    if bf16_cut < 1:
        cut = [c for c in cases if c["precision"] == "bf16" and c["device"] == "cpu"]
        for c in cut:
            c["cut"] = bf16_cut
        cases += [{**c, "precision": "float32"} for c in cut]
    bound_cases = [{**common, "batch": batch_on(dev), "dataset": d, "stage": s,
                    "precision": "float32", "device": dev,
                    "overrides": extra, "config": str(out / f"config_{d}.yaml"), "bound": name,
                    "about": about}
                   for dev in devices for name, (d, s, extra, about) in BOUNDS.items()
                   if bounds and d in datasets and s in stages]
    return cases, bound_cases


def _plan(cfgs: dict, size_scale: float) -> dict:
    """Per dataset: its images, a sample's bytes, each trainer's epochs, checkpoints kept."""
    plan = {}
    for d, cfg in cfgs.items():
        ds = DATASETS[d]
        image, mask = _scene(*_size(ds, size_scale), 0)
        fields = [encode_image(image), encode_json(ds["present"]), encode_mask(mask)]
        plan[d] = {"images": ds["images"], "split": ds["split"],
                   "sample_tar_bytes": sum(512 + -(-len(b) // 512) * 512 for b in fields),
                   "epochs": {s: getattr(cfg, s).epochs for s in TRAIN},
                   "checkpoints": {"train_seg": 2 if cfg.seg_full else 1}}
        plan[d]["epochs"]["train_seg"] *= 2 if cfg.seg_full else 1
    return plan


def _label(spec: dict) -> str:
    return (f"{spec['dataset']} {spec.get('bound', spec['stage'])} {spec['precision']} "
            f"{spec['device']}" + (f" (size x {spec['cut']:g})" if "cut" in spec else ""))


def _measure(spec: dict, size_scale: float) -> dict:
    """One case measured in its own subprocess, described, and (a bound) judged."""
    r = _subprocess(spec)
    cfg = load_config(spec["config"], spec["overrides"])
    scale = size_scale * spec.get("cut", 1.0)
    r["what"] = _what(cfg, spec["stage"], _size(DATASETS[spec["dataset"]], scale), scale)
    if "error" in r:
        print(f"[bench cost] {_label(spec)}: FAILED, {r['error']}", file=sys.stderr, flush=True)
    else:
        print(f"[bench cost] {_label(spec)}: {r['seconds']:.2f} s/img, peak +{r['peak_mb']:.0f} "
              f"MB, output {r['output_bytes']:,} B", file=sys.stderr, flush=True)
    if "bound" in spec:
        r.update(bound=spec["bound"], about=spec["about"])
        if "error" not in r:
            r["at_config_batch_mb"] = at_batch(r)
            worst = max(r["peak_mb"], r.get("reserved_mb", 0), r["at_config_batch_mb"]) / 1024
            r["verdict"] = "yes" if worst <= LIMIT_GIB else f"**no** ({worst:.1f} GiB)"
    return r


def bench_cost(out="runs/bench/cost", datasets=("voc", "coco"), stages=STAGES,
               amps=("float32", "bf16"), images: int = 1, batch: int | None = None,
               gpu_speedup: float | None = None, efficiency: float = 0.9, cpus_per_gpu: int = 8,
               bounds: bool = True, overrides=(), size_scale: float = 1.0, devices=None,
               bf16_cut: float = 1.0, gpu_tflops: float = GPU_TFLOPS) -> dict:
    """Every case in its own subprocess, then the tables; writes OUT/cost.json, cost.md and
    run_info.json. ``bf16_cut`` < 1: the bf16 cases on images and crops this much smaller (bf16
    convolutions take torch's slow reference kernels on a CPU without native bf16), beside
    float32 cases of the same cut for the ratio. ``batch``: images per training step; None
    measures the CPU at 1 and CUDA at the config's batch per rank (a GPU's time per image at
    batch 1 is mostly kernel launches). ``cost.json`` is rewritten after every case (``partial``
    true until the last), so a run stopped at a time limit keeps what it measured."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    devices = list(devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else [])))
    cfgs = {d: dataset_config(d, overrides) for d in datasets}
    for d, cfg in cfgs.items():     # resolved once: every case reads this file, not the config
        atomic_write_bytes(out / f"config_{d}.yaml", yaml.safe_dump(json.loads(json.dumps(
            dataclasses.asdict(cfg)))).encode())
    cases, bound_cases = _cases(out, devices, datasets, stages, amps, images, batch,
                                size_scale, bf16_cut, bounds)
    plan = _plan(cfgs, size_scale)
    cpu_gflops = cpu_conv_gflops()
    speedup = gpu_speedup if gpu_speedup is not None else gpu_tflops * 1000 / cpu_gflops
    print(f"[bench cost] this CPU: {cpu_gflops:.0f} GFLOP/s float32 convolution; GPU speed-up "
          f"{speedup:.0f}" + (" (--gpu-speedup)" if gpu_speedup is not None else
                              f" = {gpu_tflops:g} TFLOP/s assumed / that"), file=sys.stderr,
          flush=True)
    t0 = time.monotonic()
    rows, bound_rows = [], []

    def extrapolation() -> dict:
        ex = extrapolate(rows, plan, speedup, efficiency, cpus_per_gpu)
        ex["assumptions"].update(cpu_gflops=round(cpu_gflops, 1),
                                 gpu_tflops=None if gpu_speedup is not None else gpu_tflops)
        return ex

    def result(partial: bool) -> dict:
        return {"bench": "cost", "partial": partial, "devices": {d: device_name(d) for d in devices},
                # what amp=bf16 may give: on a CPU only a candidate, which the stages time
                # (util/precision.py; psa-dist bench precision shows their choice)
                "bf16_candidate": {d: str(amp_dtype("bf16", torch.device(d)) or "float32")
                                   for d in devices},
                "threads": torch.get_num_threads(), "size_scale": size_scale, "images": images,
                "bf16_cut": bf16_cut, "rows": rows, "bounds": bound_rows, "plan": plan,
                "extrapolation": extrapolation(),
                "seconds": round(time.monotonic() - t0, 1)}

    for i, spec in enumerate(cases + bound_cases):
        print(f"[bench cost] case {i + 1}/{len(cases) + len(bound_cases)}: {_label(spec)} "
              f"(elapsed {time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
        r = _measure(spec, size_scale)
        (bound_rows if "bound" in spec else rows).append(r)
        atomic_write_json(out / "cost.json", result(partial=True))
    res = result(partial=False)
    atomic_write_json(out / "cost.json", res)
    md = tables(res)
    atomic_write_bytes(out / "cost.md", md.encode())
    write_run_info(out, {d: dataclasses.asdict(c) for d, c in cfgs.items()},
                   bench={k: v for k, v in res.items() if k not in ("rows", "bounds",
                                                                  "extrapolation")})
    failed = sum("error" in r for r in rows + bound_rows)
    print(md + f"[bench cost] {len(rows) + len(bound_rows)} cases ({failed} failed) in "
          f"{res['seconds']:.0f} s; wrote {out / 'cost.json'}, {out / 'cost.md'}", flush=True)
    return res
