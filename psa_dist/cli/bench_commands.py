"""`psa-dist bench`: the benchmarks' arguments and what each runs (the benchmarks themselves are
``psa_dist/bench/``)."""
from __future__ import annotations

from ..bench.cases import COCO_SHARD_SIZE, IRN_SIZES, SIZES, VARIANTS
from ..bench.cost_report import GPU_TFLOPS, STAGES as COST_STAGES
from ..bench.scale_figures import COCO_TRAIN
from ..stages import table
from .arguments import config_args, from_arg, load

SCALE_DESCRIPTION = ("`psa-dist bench scale`: COCO's count end to end through the label stages on a "
                     "Ray cluster of several nodes on this machine, and what the measured "
                     "scheduling gives at 8 / 32 / 128 GPUs.")


def cmd_bench_loader(args) -> int:
    from ..bench.loader import bench_loader
    bench_loader(load(args), args.kind, args.batches, args.workers)
    return 0


def cmd_bench_random_walk(args) -> int:
    if args.method == "irn":
        from ..bench.boundary_walk import bench_boundary_walk
        bench_boundary_walk(args.out, args.beta or 10.0, args.t, args.radius, tuple(args.channels),
                            tuple(args.sizes or IRN_SIZES), args.tol)
        return 0
    from ..bench.random_walk import bench_random_walk
    bench_random_walk(args.out, args.beta or 8.0, args.t, args.radius, tuple(args.channels),
                      args.batch, tuple(args.sizes or SIZES), args.tol)
    return 0


def cmd_bench_quality(args) -> int:
    if args.list:
        for name, over in VARIANTS.items():
            print(f"{name:26} {' '.join(over) or '(the config as it is)'}")
        return 0
    from ..bench.quality import bench_quality
    rows = bench_quality(args.config, args.variants, args.out, args.overrides,
                         redo_from=args.redo_from, methods=args.methods)
    return 0 if all(r["goals_met"] for r in rows) else 1


def cmd_bench_cams(args) -> int:
    from ..bench.labels import bench_cams
    bench_cams(load(args), args.images)
    return 0


def cmd_bench_scaling(args) -> int:
    from ..bench.labels import bench_scaling
    bench_scaling(load(args), tuple(args.actors), args.images, args.shards,
                  tuple(args.tiny_shards))
    return 0


def cmd_bench_scale(args) -> int:
    from ..bench.scale import bench_scale
    bench_scale(args.out, args.config, args.overrides, args.images, args.classes, args.image_size,
                args.shard_size, args.nodes, args.cpus_per_node, args.train_images,
                export_workers=args.export_workers)
    return 0


def cmd_bench_precision(args) -> int:
    from ..bench.precision import bench_precision, config_classes
    cfg = load(args)
    bench_precision(cfg, args.classes or config_classes(cfg), args.threads, args.fresh, args.out)
    return 0


def cmd_bench_cost(args) -> int:
    from ..bench.cost import bench_cost
    amps = {"none": ["float32"], "bf16": ["bf16"], "both": ["float32", "bf16"]}[args.amp]
    datasets = ["voc", "coco"] if args.dataset == "both" else [args.dataset]
    res = bench_cost(args.out, datasets, tuple(args.stages or COST_STAGES), amps, args.images,
                     args.batch, args.gpu_speedup, args.efficiency, args.cpus_per_gpu,
                     not args.no_bounds, args.overrides, args.size_scale,
                     devices=args.devices, bf16_cut=args.bf16_cut, gpu_tflops=args.gpu_tflops)
    return 1 if any("error" in r for r in res["rows"]) else 0


def add_commands(sub) -> None:
    """``psa-dist bench ...`` on ``sub`` (the top-level subparsers)."""
    bench = sub.add_parser("bench", help="speed benchmarks, as ratios against a baseline")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    _add_part_benches(bsub)
    _add_stage_benches(bsub)
    _add_scale(bsub)
    _add_cost(bsub)
    _add_precision(bsub)


def _add_part_benches(bsub) -> None:
    p = bsub.add_parser("loader", help="training loader samples/s vs what a training step consumes")
    config_args(p, required=True)
    p.add_argument("--kind", default="cls", choices=list(table.MODELS), help="the model trained")
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--workers", type=int, help="loader workers (default: the trainer's)")
    p.set_defaults(func=cmd_bench_loader)
    p = bsub.add_parser("random-walk", help="sparse random walk vs the authors' dense one, same "
                        "inputs: time per image, peak memory, max difference")
    p.add_argument("--out", default="runs/bench", help="writes OUT/bench/random_walk.json "
                   "(random_walk_irn.json with --method irn)")
    p.add_argument("--method", default="psa", choices=["psa", "irn"],
                   help="psa: AffinityNet's walk at stride 8; irn: IRN's walk on a boundary map "
                        "at stride 4 (voc-s4 94x125, coco-s4 120x160) against its authors' "
                        "dense method")
    p.add_argument("--beta", type=float, help="default: 8 (psa), 10 (irn)")
    p.add_argument("--t", type=int, default=256)
    p.add_argument("--radius", type=int, default=5)
    p.add_argument("--channels", type=int, nargs="+", default=[3, 21],
                   help="maps propagated: present classes + background (3), all of VOC (21)")
    p.add_argument("--batch", type=int, default=8, help="images walked together (exact)")
    p.add_argument("--tol", type=float, default=1e-5, help="random_walk.tol of the sparse walk "
                   "(0: T applied t times); the t-step walk is timed beside it either way")
    p.add_argument("--sizes", nargs="+", help="feature grids: voc-s8 (47x63), coco-s8 (60x80), "
                   "coco-s4 (120x160) or HxW (default: the three named); with --method irn "
                   "voc-s4, coco-s4")
    p.set_defaults(func=cmd_bench_random_walk)


def _add_stage_benches(bsub) -> None:
    p = bsub.add_parser("quality", help="the benchmark's goals over synthetic-data variants (one "
                        "run each, resumable): a table with the spread",
                        description="Run CONFIG end to end on each variant of the synthetic data "
                        "(--list shows them) into OUT/<variant>, recording one row per variant "
                        "in OUT/quality.jsonl and the table in OUT/quality.md; recorded variants "
                        "are skipped (--from: run again from that stage on, rows replaced). "
                        "Exits 1 when a variant misses a goal.")
    config_args(p, required=True)
    p.add_argument("--variants", nargs="+", help="which (default: all)")
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--methods", nargs="+", choices=list(table.METHODS),
                   help="each in turn on every variant, the later ones on the first's classifier "
                        "and CAMs: a row each and a side-by-side table (default: the config's)")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    from_arg(p, "run the variants again from STAGE on (say random-walk after a change of "
                  "its settings), keeping the stages before it; their rows are replaced")
    p.set_defaults(func=cmd_bench_quality)
    p = bsub.add_parser("cams", help="the CAM stage end to end vs bare forward passes on the same "
                        "images in memory")
    config_args(p, required=True)
    p.add_argument("--images", type=int, default=48)
    p.set_defaults(func=cmd_bench_cams)
    p = bsub.add_parser("scaling", help="Ray label generation with 1, 2, ... actors; per-shard "
                        "overhead and driver memory on many tiny shards")
    config_args(p, required=True)
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--shards", type=int, default=8, help="shards the images are split into")
    p.add_argument("--tiny-shards", type=int, nargs="+", default=[250, 1000, 2000])
    p.set_defaults(func=cmd_bench_scaling)


def _add_scale(bsub) -> None:
    p = bsub.add_parser(
        "scale", help="COCO's count (82,783 images, 80 classes, 828 shards) through the label "
        "stages and export on a Ray cluster of several nodes on this machine; projected to "
        "8 / 32 / 128 GPUs", description=SCALE_DESCRIPTION + " Writes OUT/scale.json and "
        "OUT/scale.md; the dataset and the trained models are reused by a rerun.")
    p.add_argument("config", nargs="?", help="YAML config (default configs/demo.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, after the bench's own")
    p.add_argument("--out", default="runs/bench/scale")
    p.add_argument("--images", type=int, default=COCO_TRAIN, help="train images (COCO: 82,783)")
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--image-size", type=int, default=32, help="long side in pixels (tiny)")
    p.add_argument("--shard-size", type=int, default=COCO_SHARD_SIZE)
    p.add_argument("--nodes", type=int, default=2, help="Ray nodes besides the head (0 CPUs)")
    p.add_argument("--cpus-per-node", type=int, default=1)
    p.add_argument("--train-images", type=int, default=2000,
                   help="the first N images train the classifier and AffinityNet, one epoch each")
    p.add_argument("--export-workers", type=int, default=2)
    p.set_defaults(func=cmd_bench_scale)


def _add_cost(bsub) -> None:
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


def _add_precision(bsub) -> None:
    p = bsub.add_parser("precision", help="float32 or bf16: which precision this CPU gives each "
                        "network of a config, from timing both as the stages do",
                        description="Each trainer's step (at its batch and crop) and the CAM "
                        "stage's forward of CONFIG, random weights, timed in float32 and under bf16 "
                        "autocast on the threads the stage would take, and the precision each gets "
                        "(bf16 where it takes at most 0.95 of float32's time). Uses and fills the "
                        "cache the stages read ($PSA_DIST_CACHE/precision.json).")
    config_args(p, required=True)
    p.add_argument("--classes", type=int, help="classes of the networks (default: the dataset's, "
                   "from data.root's dataset.json, or synth.num_classes for synthetic data)")
    p.add_argument("--threads", type=int, help="threads for every case (default: each stage's own)")
    p.add_argument("--fresh", action="store_true", help="time again, replacing cached timings")
    p.add_argument("--out", default="runs/bench/precision.json", help="JSON of the rows")
    p.set_defaults(func=cmd_bench_precision)
