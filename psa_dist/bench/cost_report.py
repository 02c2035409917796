"""The arithmetic and the tables of `psa-dist bench cost` (``bench/cost.py`` measures): what a
whole dataset would take from the per-image figures, under the assumptions written beside them,
and cost.md. Pure functions of the measured rows, so that a test can redo the sums.
"""
from __future__ import annotations

from ..stages import table

# the stages of AffinityNet's method (its configs'): IRN's are not costed yet
STAGES = tuple(s.name for s in table.STAGES if s.kind in ("train", "labels") and "psa" in s.methods)
# each train stage -> the model it is timed with (the segmenters share one)
TRAIN = {s.name: s.models[0] for s in table.STAGES if s.kind == "train" and "psa" in s.methods}


def cpu_only(stage: str) -> bool:
    """A label stage that runs on CPUs whatever the cluster has (the CRF's)."""
    return stage in table.LABEL_STAGES and table.label_stage(stage).cpu_only
GPUS = (8, 32, 128)
GPU_TFLOPS = 25.0       # assumed sustained TFLOP/s of one GPU on these networks: see ASSUMPTIONS
LIMIT_GIB = 24.0
ASSUMPTIONS = {
    "gpu_speedup": "one GPU runs a network stage this many times faster than this CPU in float32 "
                   "(used when no CUDA device was measured; measured instead when CUDA is "
                   "present): by default gpu_tflops / this CPU's float32 convolution throughput, "
                   "timed in the same run (cpu_gflops), so the estimate does not depend on which "
                   "CPU measured it; --gpu-speedup sets it directly",
    "gpu_tflops": "sustained TFLOP/s of one GPU on these convolutional networks, assumed: 25 by "
                  "default (an A100 under bf16 autocast sustains about a tenth of its 312 peak "
                  "on dilated ResNets at these batches; a V100 in float32 about 10)",
    "efficiency": "G GPUs run G x efficiency times faster than one (DDP trainers and Ray label "
                  "actors alike)",
    "epochs": "trainers: the config's train_*.epochs (train_seg twice with seg_full); label "
              "stages: one pass",
    "actors": "cams and random-walk: one image at a time on each GPU's Ray actor; aff-labels (the "
              "CRF, no network) on CPU actors, cpus_per_gpu of them per GPU, each at this CPU's "
              "speed",
    "storage": "tar bytes of each stage's output sample (512-byte header + data padded to 512) x "
               "images; checkpoints once; the dataset's JPEGs are synthetic scenes (quality 90)",
    "batch": "a trainer's seconds per image are its step time / the measured batch: 1 on the CPU, "
             "the config's batch per rank on CUDA (unless --batch is given); cams and "
             "random-walk one image at a time",
    "memory_at_batch": "peak at the config's batch = fixed (weights, and for a trainer its "
                       "gradients and momentum) + batch x (measured peak - fixed) / measured batch",
}


def at_batch(row: dict, batch: int | None = None) -> float:
    """MB at ``batch`` (the config's by default), linear in the batch beyond the fixed part."""
    b = batch or row.get("config_batch") or row["batch"]
    return row["fixed_mb"] + b / row["batch"] * max(row["peak_mb"] - row["fixed_mb"], 0.0)


def _basis(rows: list, dataset: str, stage: str) -> dict | None:
    """The measured row a GPU's time is taken from: CUDA (bf16 first) when measured, else this
    CPU's float32; the CRF always from the CPU."""
    order = [("cpu", "float32"), ("cpu", "bf16")]
    if not cpu_only(stage):
        order = [("cuda", "bf16"), ("cuda", "float32")] + order
    ok = {(r["device"], r["precision"]): r for r in rows if r["dataset"] == dataset
          and r["stage"] == stage and "error" not in r and r.get("cut", 1.0) == 1.0}
    return next((ok[k] for k in order if k in ok), None)


def extrapolate(rows: list, plan: dict, gpu_speedup: float, efficiency: float = 0.9,
                cpus_per_gpu: int = 8, gpus=GPUS) -> dict:
    """Hours and bytes of whole datasets from the per-image rows. ``plan``: dataset -> images,
    epochs per stage, checkpoints kept per trainer, and the dataset's own bytes per sample.

    GPU seconds per image s = measured CUDA seconds, or this CPU's / ``gpu_speedup`` (aff-labels:
    this CPU's / ``cpus_per_gpu``); hours on G GPUs = images x epochs x s / (G x efficiency) / 3600.
    """
    res = {"assumptions": {"gpu_speedup": gpu_speedup, "efficiency": efficiency,
                           "cpus_per_gpu": cpus_per_gpu, "gpus": list(gpus), "text": ASSUMPTIONS},
           "time": [], "storage": []}
    for name, p in plan.items():
        total = {str(g): 0.0 for g in gpus}
        store = [{"dataset": name, "what": "dataset (image, cls.json, mask.png)",
                  "bytes_each": p["sample_tar_bytes"], "count": p["images"]}]
        for stage in STAGES:
            r = _basis(rows, name, stage)
            if r is None:
                continue
            if cpu_only(stage):
                s, how = r["seconds"] / cpus_per_gpu, f"this CPU / {cpus_per_gpu} CPU actors"
            elif r["device"] == "cuda":
                s, how = r["seconds"], f"CUDA {r['precision']}, measured"
            else:
                s, how = r["seconds"] / gpu_speedup, f"this CPU {r['precision']} / {gpu_speedup:.0f}"
            epochs = p["epochs"].get(stage, 1)
            hours = {str(g): p["images"] * epochs * s / (g * efficiency) / 3600 for g in gpus}
            res["time"].append({"dataset": name, "stage": stage, "images": p["images"],
                                "epochs": epochs, "gpu_seconds_per_image": s, "basis": how,
                                "hours": hours})
            total = {g: total[g] + hours[g] for g in total}
            count = p["checkpoints"].get(stage, 1) if stage in TRAIN else p["images"]
            store.append({"dataset": name, "what": stage + (" checkpoint" if stage in TRAIN else ""),
                          "bytes_each": r["tar_bytes"], "count": count})
        res["time"].append({"dataset": name, "stage": "total", "hours": total})
        for s_ in store:
            s_["total_gb"] = s_["bytes_each"] * s_["count"] / 1e9
        store.append({"dataset": name, "what": "total", "total_gb": sum(x["total_gb"] for x in store)})
        res["storage"] += store
    return res


def _fmt_s(s) -> str:
    return "–" if s is None else (f"{s:.2f}" if s < 100 else f"{s:.0f}")


def _fmt_h(h: float) -> str:
    if h < 1:
        return "< 0.1 min" if h < 1 / 600 else f"{h * 60:.1f} min"
    return f"{h:.1f} h" if h < 48 else f"{h / 24:.1f} d"


def tables(res: dict) -> str:
    """cost.md: the measured rows, the bounds, the extrapolation, its storage and assumptions."""
    by = {}
    for r in res["rows"]:
        cut = "" if r.get("cut", 1.0) == 1.0 else "@cut"
        by.setdefault((r["dataset"], r["stage"], r["device"]), {})[r["precision"] + cut] = r
    out = [f"Devices: {'; '.join(f'{k}: {v}' for k, v in res['devices'].items())}. "
           "What a bf16 setting may give here (on a CPU a candidate that the stages time, "
           "`psa-dist bench precision`): " + ", ".join(
               f"{k} {v}" for k, v in res["bf16_candidate"].items()) + ".", "",
           "| dataset | stage | what | device | float32 s/img | bf16 s/img | bf16/float32 | "
           "peak MB float32 / bf16 | MB at config batch | output bytes |", "|" + "---|" * 10]
    for (ds, stage, dev), pr in by.items():
        f32, b16 = pr.get("float32", {}), pr.get("bf16") or pr.get("bf16@cut", {})
        base = pr.get("float32@cut", f32)            # what bf16 is compared with: the same work
        any_ = f32 or b16
        if "error" in any_:
            out.append(f"| {ds} | {stage} | {any_.get('what', '')} | {dev} | {any_['error']} |"
                       + " |" * 6)
            continue
        ratio = (f"{b16['seconds'] / base['seconds']:.2f}" if base.get("seconds") and
                 b16.get("seconds") else "–")
        b16_s = _fmt_s(b16.get("seconds"))
        if "float32@cut" in pr and b16.get("seconds"):
            b16_s += f" (size x {b16['cut']:g}; float32 there {_fmt_s(base.get('seconds'))})"
        peaks = " / ".join(f"{x['peak_mb']:.0f}" + (f" (x {x['cut']:g})" if x.get("cut", 1) < 1
                                                     else "") if "peak_mb" in x else "–"
                           for x in (f32, b16))
        per = "" if any_["per"] == "image" else " (checkpoint)"
        out.append(f"| {ds} | {stage} | {any_['what']} | {dev} | {_fmt_s(f32.get('seconds'))} | "
                   f"{b16_s} | {ratio} | {peaks} | "
                   f"{at_batch(any_):.0f} (batch {any_.get('config_batch')}) | "
                   f"{any_['output_bytes']:,}{per} |")
    if res["bounds"]:
        out += ["", "| bound | what | device | s | peak MB | MB at config batch | "
                f"fits {LIMIT_GIB:g} GiB |",
                "|" + "---|" * 7]
        for b in res["bounds"]:
            if "error" in b:
                out.append(f"| {b['bound']} | {b['what']} | {b['device']} | {b['error']} | | | no |")
                continue
            out.append(f"| {b['bound']} | {b['what']} | {b['device']} | {_fmt_s(b['seconds'])} | "
                       f"{b['peak_mb']:.0f} | {b['at_config_batch_mb']:.0f} (batch "
                       f"{b['config_batch']}) | {b['verdict']} |")
    ex = res["extrapolation"]
    if ex["time"]:
        g = ex["assumptions"]["gpus"]
        out += ["", "| dataset | stage | images x epochs | GPU s/img (basis) | "
                + " | ".join(f"{n} GPUs" for n in g) + " |", "|" + "---|" * (4 + len(g))]
        for t in ex["time"]:
            head = (f"{t['images']:,} x {t['epochs']} | {t['gpu_seconds_per_image']:.3g} "
                    f"({t['basis']})" if "images" in t else " | ")
            out.append(f"| {t['dataset']} | {t['stage']} | {head} | "
                       + " | ".join(_fmt_h(t["hours"][str(n)]) for n in g) + " |")
        out += ["", "| dataset | output | bytes each | count | total GB |", "|---|---|---|---|---|"]
        for s in ex["storage"]:
            each = f"{s['bytes_each']:,}" if "bytes_each" in s else ""
            out.append(f"| {s['dataset']} | {s['what']} | {each} | {s.get('count', ''):,} | "
                       f"{s['total_gb']:.2f} |" if "count" in s else
                       f"| {s['dataset']} | **total** | | | **{s['total_gb']:.2f}** |")
        a = ex["assumptions"]
        derived = (f" (= gpu_tflops {a['gpu_tflops']:g} / this CPU's {a['cpu_gflops']:g} GFLOP/s)"
                   if a.get("gpu_tflops") else "")
        out += ["", f"Assumptions: gpu_speedup {a['gpu_speedup']:.0f}{derived}, efficiency "
                f"{a['efficiency']:g}, cpus_per_gpu {a['cpus_per_gpu']}."]
        out += [f"- {k}: {v}" for k, v in a["text"].items()]
    return "\n".join(out) + "\n"
