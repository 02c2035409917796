"""`psa-dist bench scale`'s figures: one label stage's from its shard log and the times its lines
arrived (:func:`stage_figures`), the projection of the label stages to COCO on 8 / 32 / 128 GPUs
from them (:func:`project`), and the markdown tables (:func:`format_table`). Pure functions of
what ``bench/scale.py`` measured; ``tests/bench/test_bench_scale.py`` checks them against hand
computations."""
from __future__ import annotations

import math
import pickle
import statistics

COCO_TRAIN = 82_783
# Seconds per COCO image (640x480, ResNet-50) of one actor, from docs/performance.md's COCO rows
# ("Extrapolated to the whole training sets"): the GPU times are machine A's float32 CPU time / 89
# (25 TFLOP/s assumed); aff_labels is CPU work (the dense CRF), one image per CPU actor, 8 CPU
# actors per GPU.
COCO_S_PER_IMAGE = {"cams": 16.10 / 89, "aff_labels": 0.89, "random_walk": 0.89 / 89}
ACTORS_PER_GPU = {"cams": 1, "aff_labels": 8, "random_walk": 1}
GPUS = (8, 32, 128)


def stage_figures(name: str, lines: list, arrivals: list, wall: float, actors: int,
                  stage_start: float | None) -> dict:
    """One label stage's figures from its shard log (``lines``), the times its lines were seen
    (``arrivals``: (time, line)), its wall time and its actors."""
    secs = [float(r["seconds"]) for r in lines]
    samples = sum(int(r["samples"]) for r in lines)
    n, work = len(lines), sum(secs)
    med = statistics.median(secs) if secs else float("nan")
    fig = {"stage": name, "shards": n, "images": samples, "actors": actors,
           "nodes": len({r.get("node") for r in lines if r.get("node")}),
           "wall_s": round(wall, 2), "work_s": round(work, 2),
           "shards_per_s": round(n / wall, 3), "images_per_s": round(samples / wall, 1),
           "shard_s_median": round(med, 3), "shard_s_max": round(max(secs, default=0.0), 3),
           "shard_s_min": round(min(secs, default=0.0), 3),
           "longest_over_median": round(max(secs) / med, 3) if secs and med > 0 else None,
           # the stage against the sum of its shards' work spread over the actors (1 = no loss)
           "wall_over_work_per_actor": round(wall / (work / actors), 3) if work else None,
           "overhead_ms_per_shard": round(1000 * (wall * actors - work) / n, 1) if n else None}
    # start-up: from the stage's start to its first shard's line, less that shard's own time;
    # tail: each actor's idle time after its last shard until the stage's last shard
    if arrivals and stage_start is not None:
        t_first, first = arrivals[0]
        startup = max(0.0, t_first - stage_start - float(first["seconds"]))
        t_last = arrivals[-1][0]
        last_of: dict = {}
        for t, r in arrivals:
            last_of[r.get("pid")] = t
        tail = sum(t_last - t for t in last_of.values()) + (actors - len(last_of)) * (t_last - t_first)
        fig.update({"startup_s": round(startup, 2), "tail_idle_actor_s": round(tail, 2),
                    "overhead_steady_ms_per_shard":
                        round(1000 * (wall * actors - work - actors * startup - tail) / n, 1)})
    return fig


def inline_bytes(lines: list) -> int:
    """The pickled size of every task's arguments (two paths) and of its result, from the log
    (results below Ray's 100 KiB inline limit travel in the task's messages, not the store)."""
    return sum(len(pickle.dumps((r["shard"], r["out"]))) + len(pickle.dumps(r)) for r in lines)


def project(stages: list, images: int = COCO_TRAIN, gpus=GPUS, s_per_image: dict | None = None,
            shard_sizes=(100, 500), speculate_after: float = 3.0,
            speculate_min_s: float = 30.0) -> list:
    """The label stages of ``images`` in shards of ``shard_sizes`` on G GPUs, from the measured
    scheduling: A actors (G, or 8 G CPU actors for aff_labels), a shard's work w = shard size x
    seconds per image (:data:`COCO_S_PER_IMAGE`), the steady overhead o per shard, the start-up u
    and the spread d = longest - median shard, in seconds, measured here:

        T = u + ceil(S / A) x (w + o) + d        ideal: S x w / A

    (S = ceil(images / shard size) shards in waves of A; the last wave ends with its slowest
    shard). d is taken in seconds, not as a ratio: the shards here are alike and a fraction of a
    second long, so their spread is the machine's jitter, which does not grow with the work. A
    straggler (one slow actor or node) adds at most max(speculate_after x w, speculate_min_s):
    then an idle actor has started a copy of its shard, which takes w, as the shard would have
    (``ray.speculate_after``, ``ray.speculate_min_s``); ``straggler_minutes`` is T with it."""
    s_per_image = s_per_image or COCO_S_PER_IMAGE
    rows = []
    for fig in stages:
        name = fig["stage"]
        steady = fig.get("overhead_steady_ms_per_shard")
        o = max(0.0, (fig["overhead_ms_per_shard"] if steady is None else steady) / 1000)
        u = fig.get("startup_s") or 0.0
        d = max(0.0, fig["shard_s_max"] - fig["shard_s_median"])
        for size in shard_sizes:
            n = math.ceil(images / size)
            w = size * s_per_image[name]
            for g in gpus:
                a = g * ACTORS_PER_GPU[name]
                t = u + math.ceil(n / a) * (w + o) + d
                late = max(speculate_after * w, speculate_min_s) if speculate_after > 0 else w
                ideal = n * w / a
                rows.append({"stage": name, "shard_size": size, "shards": n, "gpus": g,
                             "actors": a, "waves": math.ceil(n / a), "shard_work_s": round(w, 1),
                             "minutes": round(t / 60, 2), "ideal_minutes": round(ideal / 60, 2),
                             "efficiency": round(ideal / t, 3),
                             "straggler_minutes": round((t + late) / 60, 2)})
    return rows


def format_table(res: dict) -> str:
    """The figures as markdown tables (``OUT/scale.md``)."""
    st = res["stages"]
    head = ("| stage | shards | images | actors | wall s | shards/s | img/s | work s | wall / "
            "(work / actors) | overhead ms/shard (all / steady) | start-up s | tail idle actor-s | "
            "shard s median / max (x) | driver peak MB | GCS MB (min-max) | store bytes | inline "
            "bytes |\n|" + "---|" * 17 + "\n")
    rows = "".join(
        f"| {f['stage']} | {f['shards']} | {f['images']} | {f['actors']} | {f['wall_s']} | "
        f"{f['shards_per_s']} | {f['images_per_s']} | {f['work_s']} | "
        f"{f['wall_over_work_per_actor']} | {f['overhead_ms_per_shard']} / "
        f"{f.get('overhead_steady_ms_per_shard')} | {f.get('startup_s')} | "
        f"{f.get('tail_idle_actor_s')} | {f['shard_s_median']} / {f['shard_s_max']} "
        f"({f['longest_over_median']}) | {f['driver_peak_mb']} | "
        f"{'-'.join(map(str, f['gcs_rss_mb'] or []))} | {f['store_created_bytes']} | "
        f"{f['inline_bytes']} |\n" for f in st)
    e = res["export"]
    tr = res["training"]["steps"]
    extra = (f"\nexport --what pseudo: {e['images']} images in {e['seconds']} s "
             f"({e['images_per_s']} img/s), driver peak {e['driver_peak_mb']} MB; every key once: "
             f"{e['every_key_once']}\n"
             f"training on {res['training']['images']} images: classifier "
             f"{tr['train_cls'].get('steps')} steps in {tr['train_cls']['wall_s']} s, AffinityNet "
             f"{tr['train_aff'].get('steps')} steps in {tr['train_aff']['wall_s']} s\n"
             f"GCS server RSS: {res['gcs_rss_mb_start']} MB at the start, {res['gcs_rss_mb_max']} "
             f"MB at most, {res['gcs_rss_mb_end']} MB at the end (peak {res['gcs_peak_mb']})\n")
    proj = ("\n| stage | shard size | shards | GPUs | actors | waves | shard work s | minutes | "
            "ideal minutes | efficiency | with a straggler, minutes |\n|" + "---|" * 11 + "\n" +
            "".join(f"| {p['stage']} | {p['shard_size']} | {p['shards']} | {p['gpus']} | "
                    f"{p['actors']} | {p['waves']} | {p['shard_work_s']} | {p['minutes']} | "
                    f"{p['ideal_minutes']} | {p['efficiency']} | {p['straggler_minutes']} |\n"
                    for p in res["projection"]))
    return head + rows + extra + proj
