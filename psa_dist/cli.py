"""`psa-dist`: the one command-line entry point. Each subcommand's --help says what it does."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .bench.cost import GPU_TFLOPS, STAGES as COST_STAGES, bench_cost
from .bench.labels import bench_cams, bench_scaling
from .bench.loader import bench_loader
from .bench.quality import VARIANTS, bench_quality
from .bench.random_walk import SIZES, bench_random_walk
from .bench.scale import add_parser as add_bench_scale
from .cluster.launch import LAUNCHERS
from .cluster.shard_pool import StageFailed
from .cluster.slurm_chain import ChainError
from .config import ConfigError, load_config
from .data.convert_coco import convert_coco
from .data.convert_voc import convert_voc
from .data.dataset_writer import BuildError
from .data.inspect import format_report, inspect_dataset, preview_dataset
from .data.shards import ShardError
from .data.synth import write_synth
from .nets.mxnet_params import convert_params
from .pipeline import label_dataset, run_pipeline
from .stages.export import LAYOUTS, WHAT, ExportError, export
from .stages.predict import predict
from .stages import table
from .submit import submit_chain
from .util.runinfo import write_run_info


def _add_config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("config", nargs=None if required else "?", help="YAML config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train_cls.epochs=2")


def _load(args):
    return load_config(args.config, args.overrides)


# ----------------------------------------------------------------------------- data
def cmd_data_synth(args) -> int:
    cfg = _load(args)
    out = Path(args.out or cfg.data.root)
    write_synth(cfg.synth, out, shard_size=cfg.data.shard_size, workers=cfg.data.workers, config=cfg)
    write_run_info(out, cfg)
    return 0


def cmd_data_convert_voc(args) -> int:
    convert_voc(args.voc_root, args.out, splits=args.splits, sbd_root=args.sbd_root,
                       shard_size=args.shard_size, workers=args.workers, strict=args.strict)
    return 0


def cmd_data_convert_coco(args) -> int:
    convert_coco(args.coco_root, args.out, splits=args.splits, shard_size=args.shard_size,
                        workers=args.workers, strict=args.strict)
    return 0


def cmd_data_convert_weights(args) -> int:
    n = convert_params(args.params, args.out)
    print(f"[data] wrote {args.out}: {n} tensors of {args.params} in the authors' torch names "
          f"(model.pretrained reads it, or the .params file itself)", flush=True)
    return 0


def cmd_data_inspect(args) -> int:
    report = inspect_dataset(args.root, verify=not args.quick, shard_url=args.shard_url)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 1 if report["problems"] else 0


def cmd_data_preview(args) -> int:
    out = preview_dataset(args.root, args.out, split=args.split, count=args.count,
                          shard_url=args.shard_url)
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------- pipeline
def cmd_run(args) -> int:
    _launcher_overrides(args)
    return run_pipeline(_load(args), force=args.force, redo_from=args.redo_from)


def _add_from_arg(p, help: str) -> None:
    """``--from STAGE`` (``random-walk`` or ``random_walk``), parsed to the stage's name."""
    p.add_argument("--from", dest="redo_from", metavar="STAGE", help=help,
                   type=lambda v: v.replace("-", "_"), choices=list(table.ORDER))


def _launcher_overrides(args) -> None:
    if getattr(args, "launcher", None):
        sections = dict.fromkeys(m.section for m in table.MODELS.values())
        args.overrides = list(args.overrides) + [f"{s}.launcher={args.launcher}" for s in sections]


def cmd_stage(args) -> int:
    if getattr(args, "ray_address", None):
        args.overrides = list(args.overrides) + [f"ray.address={args.ray_address}"]
    _launcher_overrides(args)
    return run_pipeline(_load(args), stages=[args.stage], force=args.force)


def cmd_submit(args) -> int:
    submit_chain(_load(args), args.config, dry_run=args.dry_run, force=args.force,
                 keep_blocked=args.keep_blocked)
    return 0


def cmd_export(args) -> int:
    export(_load(args), args.what, args.out, layout=args.layout, split=args.split,
           workers=args.workers, overwrite=args.overwrite, scales=tuple(args.scales),
           flip=args.flip)
    return 0


def cmd_predict(args) -> int:
    summary = predict(_load(args), args.input, args.out, scales=tuple(args.scales), flip=args.flip,
                      crf=args.crf, split=args.split, use_ray=False if args.no_ray else None)
    return 1 if summary["failed"] or summary["failed_shards"] else 0


def cmd_label(args) -> int:
    label_dataset(_load(args), args.input, args.out, split=args.split)
    return 0


def _add_test_time_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument("--scales", type=float, nargs="+", default=[1.0],
                   help=f"{prefix}test scales, e.g. 0.75 1.0 1.25 (softmax averaged)")
    p.add_argument("--flip", action="store_true", help=f"{prefix}average with the mirror image")


def _add_launcher_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--launcher", choices=list(LAUNCHERS),
                   help="where the trainers run (sets train_*.launcher): in this process, as a "
                        "torchrun rank, as a submitit job on this machine, or as a SLURM job")


def cmd_bench_loader(args) -> int:
    bench_loader(_load(args), args.kind, args.batches, args.workers)
    return 0


def cmd_bench_random_walk(args) -> int:
    bench_random_walk(args.out, args.beta, args.t, args.radius, tuple(args.channels), args.batch,
                      tuple(args.sizes or SIZES), args.tol)
    return 0


def cmd_bench_quality(args) -> int:
    if args.list:
        for name, over in VARIANTS.items():
            print(f"{name:26} {' '.join(over) or '(the config as it is)'}")
        return 0
    rows = bench_quality(args.config, args.variants, args.out, args.overrides,
                         redo_from=args.redo_from)
    return 0 if all(r["goals_met"] for r in rows) else 1


def cmd_bench_cams(args) -> int:
    bench_cams(_load(args), args.images)
    return 0


def cmd_bench_scaling(args) -> int:
    bench_scaling(_load(args), tuple(args.actors), args.images, args.shards,
                  tuple(args.tiny_shards))
    return 0


def cmd_bench_cost(args) -> int:
    amps = {"none": ["float32"], "bf16": ["bf16"], "both": ["float32", "bf16"]}[args.amp]
    datasets = ["voc", "coco"] if args.dataset == "both" else [args.dataset]
    res = bench_cost(args.out, datasets, tuple(args.stages or COST_STAGES), amps, args.images,
                     args.batch, args.gpu_speedup, args.efficiency, args.cpus_per_gpu,
                     not args.no_bounds, args.overrides, args.size_scale,
                     devices=args.devices, bf16_cut=args.bf16_cut, gpu_tflops=args.gpu_tflops)
    return 1 if any("error" in r for r in res["rows"]) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="psa-dist",
        description="Weakly supervised semantic segmentation with AffinityNet, on Ray and torch DDP.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the whole pipeline of a config into its out_dir",
                       description="Run every stage of CONFIG into cfg.out_dir; finished stages are "
                                   "skipped, so a rerun resumes where the last one stopped.")
    _add_config_args(p, required=True)
    p.add_argument("--force", action="store_true",
                   help="redo every stage from scratch (their earlier outputs are removed)")
    _add_from_arg(p, "redo STAGE and every later one from scratch, keep the earlier ones")
    _add_launcher_arg(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("submit", help="submit the whole pipeline as dependent SLURM jobs and exit",
                       description="Submit one SLURM job per step (" +
                       ", ".join(name for name, _ in table.chain_steps()) + "), each starting "
                       "when the previous one succeeded; steps already done are left out. Job ids "
                       "go to out_dir/stages/submitted.json.")
    _add_config_args(p, required=True)
    p.add_argument("--dry-run", action="store_true",
                   help="print each job's sbatch parameters without submitting")
    p.add_argument("--force", action="store_true",
                   help="submit even if jobs of an earlier submission are still queued")
    p.add_argument("--keep-blocked", action="store_true",
                   help="when a step fails, leave the later jobs pending (DependencyNeverSatisfied) "
                        "instead of letting SLURM cancel them")
    p.set_defaults(func=cmd_submit)

    for stage in table.STAGES:
        p = sub.add_parser(stage.cli, help=stage.help,
                           description=f"Run one stage of the pipeline: {stage.help}. Reads and "
                           "writes the config's out_dir, so stages can run on other machines.")
        _add_config_args(p, required=True)
        p.add_argument("--force", action="store_true",
                       help="redo the stage from scratch (its earlier outputs are removed)")
        if stage.kind == "labels":
            p.add_argument("--ray-address", help="run on an existing Ray cluster (same as the "
                           "override ray.address=HOST:PORT)")
        if stage.kind == "train":
            _add_launcher_arg(p)
        p.set_defaults(func=cmd_stage, stage=stage.name)

    p = sub.add_parser("export", help="write a run's pseudo labels, CAMs, affinity labels or "
                       "segmenter predictions as files (VOC or mmsegmentation layout)",
                       description="One file per image, named by its key: index PNGs in the "
                       "dataset's palette (class ids unchanged, 255 ignore) beside the images, "
                       "with an image list; CAMs as float16 .npy. Resumes; refuses a directory "
                       "holding other files unless --overwrite.")
    _add_config_args(p, required=True)
    p.add_argument("--what", required=True, choices=list(WHAT),
                   help="pseudo: random-walk pseudo labels; aff_labels; cams; pred: the segmenter")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--layout", default="voc", choices=list(LAYOUTS),
                   help="voc: JPEGImages/ SegmentationClassAug/ ImageSets/; mmseg: img_dir/ ann_dir/")
    p.add_argument("--split", help="split (default: data.train_split; for pred data.val_split)")
    p.add_argument("--workers", type=int, default=2, help="worker processes")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty directory")
    _add_test_time_args(p, "pred: ")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="the trained segmenter on new images (folder, glob or "
                       "shard dataset): index PNGs and colour overlays",
                       description="Predict with the run's segmenter (out_dir/seg): a folder of "
                       "JPEG/PNG files, a glob, or a shard dataset. Writes OUT/<name>.png and "
                       "OUT/overlay/<name>.png; resumes; a corrupt file is reported and skipped. "
                       "A shard dataset with masks is scored (OUT/eval.json, eval.md).")
    _add_config_args(p, required=True)
    p.add_argument("--input", required=True, help="folder, glob ('imgs/**/*.jpg') or dataset dir")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--split", help="a dataset's split (default data.val_split)")
    _add_test_time_args(p)
    p.add_argument("--crf", action="store_true", help="dense CRF on the probabilities "
                   "(aff_labels.crf_* settings; needs psa-dist[crf])")
    p.add_argument("--no-ray", action="store_true", help="in this process, not on Ray actors")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("label", help="CAMs and pseudo labels for another dataset from a run's "
                       "trained classifier and AffinityNet (nothing is trained)",
                       description="The label stages of the run CONFIG, pointed at another "
                       "converted dataset: OUT becomes a run directory whose models are the run's "
                       "and whose cams/ and random_walk/ hold the new data's CAMs and pseudo "
                       "labels (psa-dist export them with out_dir=OUT data.root=INPUT "
                       "data.source=shards).")
    _add_config_args(p, required=True)
    p.add_argument("--input", required=True, help="dataset directory (dataset.json + shards)")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--split", default="train", help="the dataset's split to label")
    p.set_defaults(func=cmd_label)

    bench = sub.add_parser("bench", help="speed benchmarks, as ratios against a baseline")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    p = bsub.add_parser("loader", help="training loader samples/s vs what a training step consumes")
    _add_config_args(p, required=True)
    p.add_argument("--kind", default="cls", choices=list(table.MODELS), help="the model trained")
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--workers", type=int, help="loader workers (default: the trainer's)")
    p.set_defaults(func=cmd_bench_loader)
    p = bsub.add_parser("random-walk", help="sparse random walk vs the authors' dense one, same "
                        "inputs: time per image, peak memory, max difference")
    p.add_argument("--out", default="runs/bench", help="writes OUT/bench/random_walk.json")
    p.add_argument("--beta", type=float, default=8.0)
    p.add_argument("--t", type=int, default=256)
    p.add_argument("--radius", type=int, default=5)
    p.add_argument("--channels", type=int, nargs="+", default=[3, 21],
                   help="maps propagated: present classes + background (3), all of VOC (21)")
    p.add_argument("--batch", type=int, default=8, help="images walked together (exact)")
    p.add_argument("--tol", type=float, default=1e-5, help="random_walk.tol of the sparse walk "
                   "(0: T applied t times); the t-step walk is timed beside it either way")
    p.add_argument("--sizes", nargs="+", help="feature grids: voc-s8 (47x63), coco-s8 (60x80), "
                   "coco-s4 (120x160) or HxW (default: the three named)")
    p.set_defaults(func=cmd_bench_random_walk)
    p = bsub.add_parser("quality", help="the benchmark's goals over synthetic-data variants (one "
                        "run each, resumable): a table with the spread",
                        description="Run CONFIG end to end on each variant of the synthetic data "
                        "(--list shows them) into OUT/<variant>, recording one row per variant "
                        "in OUT/quality.jsonl and the table in OUT/quality.md; recorded variants "
                        "are skipped (--from: run again from that stage on, rows replaced). "
                        "Exits 1 when a variant misses a goal.")
    _add_config_args(p, required=True)
    p.add_argument("--variants", nargs="+", help="which (default: all)")
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    _add_from_arg(p, "run the variants again from STAGE on (say random-walk after a change of "
                  "its settings), keeping the stages before it; their rows are replaced")
    p.set_defaults(func=cmd_bench_quality)
    p = bsub.add_parser("cams", help="the CAM stage end to end vs bare forward passes on the same "
                        "images in memory")
    _add_config_args(p, required=True)
    p.add_argument("--images", type=int, default=48)
    p.set_defaults(func=cmd_bench_cams)
    p = bsub.add_parser("scaling", help="Ray label generation with 1, 2, ... actors; per-shard "
                        "overhead and driver memory on many tiny shards")
    _add_config_args(p, required=True)
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--shards", type=int, default=8, help="shards the images are split into")
    p.add_argument("--tiny-shards", type=int, nargs="+", default=[250, 1000, 2000])
    p.set_defaults(func=cmd_bench_scaling)
    add_bench_scale(bsub)

    p = bsub.add_parser("cost", help="per-image seconds, peak memory and output bytes of every "
                        "stage at real size, and VOC / COCO extrapolated to 8, 32, 128 GPUs",
                        description="Each stage of configs/voc_resnet38.yaml on a 500x375 image "
                        "and of configs/coco_resnet50.yaml on a 640x480 one (random weights), in "
                        "float32 and bf16, each case in its own process, on this CPU and on CUDA "
                        "when present; then the time and storage of VOC train_aug (10,582 images) "
                        "and COCO train (82,783) on 8, 32 and 128 GPUs, assumptions stated. "
                        "Writes OUT/cost.json, OUT/cost.md, OUT/run_info.json.")
    p.add_argument("overrides", nargs="*", help="overrides of both configs (tests: "
                   "model.backbone=small model.segmenter=light model.aff_dims=null model.frozen_layers=[])")
    p.add_argument("--dataset", choices=["voc", "coco", "both"], default="both")
    p.add_argument("--images", type=int, default=1, help="images per case (the median is kept)")
    p.add_argument("--amp", choices=["none", "bf16", "both"], default="both",
                   help="float32, bf16 autocast (forced on, also on this CPU), or both")
    p.add_argument("--stages", nargs="+", choices=list(COST_STAGES), help="default: all")
    p.add_argument("--out", default="runs/bench/cost")
    p.add_argument("--batch", type=int, default=None,
                   help="images per measured training step (default: 1 on the CPU, the config's "
                        "batch per rank on CUDA)")
    p.add_argument("--devices", nargs="+", choices=["cpu", "cuda"],
                   help="where to measure (default: the CPU, and CUDA where there is one)")
    p.add_argument("--gpu-speedup", type=float, default=None,
                   help="GPU / this CPU's float32, where no CUDA device was measured (default: "
                        "--gpu-tflops / this CPU's convolution throughput, timed in the run)")
    p.add_argument("--gpu-tflops", type=float, default=GPU_TFLOPS,
                   help=f"sustained TFLOP/s of one GPU, assumed (default {GPU_TFLOPS:g})")
    p.add_argument("--efficiency", type=float, default=0.9, help="G GPUs = G x this x one GPU")
    p.add_argument("--cpus-per-gpu", type=int, default=8, help="CPU actors of aff-labels per GPU")
    p.add_argument("--no-bounds", action="store_true",
                   help="skip the walk at stride 4 and ResNet-38 at scale 2.0")
    p.add_argument("--bf16-cut", type=float, default=1.0,
                   help="the bf16 cases on images and crops this much smaller, beside float32 "
                        "cases of the same cut for the ratio (on a CPU without native bf16, bf16 "
                        "convolutions run torch's slow reference kernels: 0.125 there)")
    p.add_argument("--size-scale", type=float, default=1.0,
                   help="images and crops times this (for tests; 1 = real size)")
    p.set_defaults(func=cmd_bench_cost)

    data = sub.add_parser("data", help="create, convert and look at datasets (WebDataset shards)")
    dsub = data.add_subparsers(dest="data_command", required=True)

    p = dsub.add_parser("synth", help="generate the embedded synthetic dataset as shards",
                        description="Generate the synthetic train/val splits (cfg.synth) as shards "
                                    "into --out (default cfg.data.root).")
    _add_config_args(p)
    p.add_argument("--out", help="dataset directory to write")
    p.set_defaults(func=cmd_data_synth)

    def conv_common(p, default_splits):
        p.add_argument("--out", required=True, help="dataset directory to write")
        p.add_argument("--splits", default=default_splits, type=lambda s: s.split(","),
                       help=f"comma-separated splits (default {default_splits})")
        p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
        p.add_argument("--workers", type=int, default=4, help="worker processes")
        p.add_argument("--strict", action="store_true", help="stop at the first bad input")

    p = dsub.add_parser("convert-voc", help="convert PASCAL VOC 2012 (+SBD) to shards",
                        description="Convert VOCdevkit/VOC2012 (JPEGImages, SegmentationClass, "
                                    "ImageSets/Segmentation, Annotations) and optionally SBD's "
                                    "SegmentationClassAug to shards.")
    p.add_argument("voc_root", help="the VOC2012 directory (holding JPEGImages/)")
    p.add_argument("--sbd-root", help="directory holding SegmentationClassAug/ (train_aug masks)")
    conv_common(p, "train_aug,val")
    p.set_defaults(func=cmd_data_convert_voc)

    p = dsub.add_parser("convert-coco", help="convert MS-COCO 2014 to shards (needs pycocotools)",
                        description="Convert COCO 2014 (train2014/, val2014/, annotations/"
                                    "instances_*.json) to shards with semantic masks.")
    p.add_argument("coco_root", help="directory holding train2014/, val2014/ and annotations/")
    conv_common(p, "train2014,val2014")
    p.set_defaults(func=cmd_data_convert_coco)

    p = dsub.add_parser("convert-weights",
                        help="the authors' MXNet ResNet-38 .params to a torch file (no mxnet)",
                        description="Read an MXNet .params file (the authors' ImageNet ResNet-38, "
                                    "ilsvrc-cls_rna-a1_cls1000_ep-0001.params) without mxnet and "
                                    "write its tensors as a torch state dict in the authors' names "
                                    "(as their convert_mxnet_to_torch). model.pretrained also "
                                    "reads the .params file directly.")
    p.add_argument("params", help="the .params file")
    p.add_argument("--out", required=True, help="the .pth file to write")
    p.set_defaults(func=cmd_data_convert_weights)

    p = dsub.add_parser("inspect", help="counts per split and a class histogram",
                        description="Read every shard of a dataset and print counts per split and "
                                    "a class histogram; exits 1 if a shard or sample is bad.")
    p.add_argument("root")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quick", action="store_true", help="count samples without decoding them")
    p.add_argument("--shard-url", help="read the shards through this WebDataset URL template "
                   "(data.shard_url, e.g. 'pipe:aws s3 cp s3://bucket/voc/{name} -'); "
                   "dataset.json still comes from ROOT")
    p.set_defaults(func=cmd_data_inspect)

    p = dsub.add_parser("preview", help="write a PNG grid of images with their masks overlaid")
    p.add_argument("root")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--split", default="train")
    p.add_argument("--count", type=int, default=16)
    p.add_argument("--shard-url", help="as for data inspect")
    p.set_defaults(func=cmd_data_preview)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also come after options (`train-cls cfg.yaml --launcher local a.b=1`)
    bad = [a for a in extra if a.startswith("-") or "=" not in a]
    if bad or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return int(args.func(args) or 0)
    except (ConfigError, ShardError, BuildError, ChainError, ExportError, FileNotFoundError,
            ImportError) as e:
        print(f"psa-dist: error: {e}", file=sys.stderr)
        return 2
    except StageFailed as e:        # the work ran; too much of its input was bad
        print(f"psa-dist: failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
