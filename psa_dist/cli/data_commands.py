"""`psa-dist data`: create, convert and look at datasets; the arguments and what each runs."""
from __future__ import annotations

import json
from pathlib import Path

from .arguments import config_args, load


def cmd_data_synth(args) -> int:
    from ..data.synth import write_synth
    from ..util.runinfo import write_run_info
    cfg = load(args)
    out = Path(args.out or cfg.data.root)
    write_synth(cfg.synth, out, shard_size=cfg.data.shard_size, workers=cfg.data.workers, config=cfg)
    write_run_info(out, cfg)
    return 0


def cmd_data_convert_voc(args) -> int:
    from ..data.convert_voc import convert_voc
    convert_voc(args.voc_root, args.out, splits=args.splits, sbd_root=args.sbd_root,
                       shard_size=args.shard_size, workers=args.workers, strict=args.strict)
    return 0


def cmd_data_convert_coco(args) -> int:
    from ..data.convert_coco import convert_coco
    convert_coco(args.coco_root, args.out, splits=args.splits, shard_size=args.shard_size,
                        workers=args.workers, strict=args.strict)
    return 0


def cmd_data_convert_weights(args) -> int:
    from ..nets.mxnet_params import convert_params
    n = convert_params(args.params, args.out)
    print(f"[data] wrote {args.out}: {n} tensors of {args.params} in the authors' torch names "
          f"(model.pretrained reads it, or the .params file itself)", flush=True)
    return 0


def cmd_data_inspect(args) -> int:
    from ..data.dataset_view import format_report, inspect_dataset
    report = inspect_dataset(args.root, verify=not args.quick, shard_url=args.shard_url)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 1 if report["problems"] else 0


def cmd_data_preview(args) -> int:
    from ..data.dataset_view import preview_dataset
    out = preview_dataset(args.root, args.out, split=args.split, count=args.count,
                          shard_url=args.shard_url)
    print(f"wrote {out}")
    return 0


def _convert_args(p, default_splits: str) -> None:
    p.add_argument("--out", required=True, help="dataset directory to write")
    p.add_argument("--splits", default=default_splits, type=lambda s: s.split(","),
                   help=f"comma-separated splits (default {default_splits})")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--workers", type=int, default=4, help="worker processes")
    p.add_argument("--strict", action="store_true", help="stop at the first bad input")


def add_commands(sub) -> None:
    """``psa-dist data ...`` on ``sub`` (the top-level subparsers)."""
    data = sub.add_parser("data", help="create, convert and look at datasets (WebDataset shards)")
    dsub = data.add_subparsers(dest="data_command", required=True)

    p = dsub.add_parser("synth", help="generate the embedded synthetic dataset as shards",
                        description="Generate the synthetic train/val splits (cfg.synth) as shards "
                                    "into --out (default cfg.data.root).")
    config_args(p)
    p.add_argument("--out", help="dataset directory to write")
    p.set_defaults(func=cmd_data_synth)

    p = dsub.add_parser("convert-voc", help="convert PASCAL VOC 2012 (+SBD) to shards",
                        description="Convert VOCdevkit/VOC2012 (JPEGImages, SegmentationClass, "
                                    "ImageSets/Segmentation, Annotations) and optionally SBD's "
                                    "SegmentationClassAug to shards.")
    p.add_argument("voc_root", help="the VOC2012 directory (holding JPEGImages/)")
    p.add_argument("--sbd-root", help="directory holding SegmentationClassAug/ (train_aug masks)")
    _convert_args(p, "train_aug,val")
    p.set_defaults(func=cmd_data_convert_voc)

    p = dsub.add_parser("convert-coco", help="convert MS-COCO 2014 to shards (needs pycocotools)",
                        description="Convert COCO 2014 (train2014/, val2014/, annotations/"
                                    "instances_*.json) to shards with semantic masks.")
    p.add_argument("coco_root", help="directory holding train2014/, val2014/ and annotations/")
    _convert_args(p, "train2014,val2014")
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
