"""`psa-dist run`, `submit`, one subcommand per stage of the table, `export`, `predict` and
`label`: their arguments and what each runs."""
from __future__ import annotations

from ..config import Config
from ..stages import table
from ..stages.export_layouts import LAYOUTS
from .arguments import config_args, from_arg, launcher_arg, load, test_time_args


def cmd_run(args) -> int:
    from ..pipeline import run_pipeline
    _launcher_overrides(args)
    return run_pipeline(load(args), force=args.force, redo_from=args.redo_from)


def _launcher_overrides(args) -> None:
    if getattr(args, "launcher", None):
        sections = dict.fromkeys(m.section for m in table.MODELS.values())
        args.overrides = list(args.overrides) + [f"{s}.launcher={args.launcher}" for s in sections]


def cmd_stage(args) -> int:
    from ..pipeline import run_pipeline
    if getattr(args, "ray_address", None):
        args.overrides = list(args.overrides) + [f"ray.address={args.ray_address}"]
    _launcher_overrides(args)
    return run_pipeline(load(args), stages=[args.stage], force=args.force)


def cmd_submit(args) -> int:
    from ..submit import submit_chain
    submit_chain(load(args), args.config, dry_run=args.dry_run, force=args.force,
                 keep_blocked=args.keep_blocked)
    return 0


def cmd_export(args) -> int:
    from ..stages.export import export
    export(load(args), args.what, args.out, layout=args.layout, split=args.split,
           workers=args.workers, overwrite=args.overwrite, scales=tuple(args.scales),
           flip=args.flip)
    return 0


def cmd_predict(args) -> int:
    from ..stages.predict import predict
    summary = predict(load(args), args.input, args.out, scales=tuple(args.scales), flip=args.flip,
                      crf=args.crf, split=args.split, use_ray=False if args.no_ray else None)
    return 1 if summary["failed"] or summary["failed_shards"] else 0


def cmd_label(args) -> int:
    from ..pipeline import label_dataset
    label_dataset(load(args), args.input, args.out, split=args.split)
    return 0


def add_commands(sub) -> None:
    """The pipeline's subcommands on ``sub`` (the top-level subparsers)."""
    _add_run_commands(sub)
    _add_result_commands(sub)


def _add_run_commands(sub) -> None:
    p = sub.add_parser("run", help="run the whole pipeline of a config into its out_dir",
                       description="Run every stage of CONFIG into cfg.out_dir; finished stages are "
                                   "skipped, so a rerun resumes where the last one stopped.")
    config_args(p, required=True)
    p.add_argument("--force", action="store_true",
                   help="redo every stage from scratch (their earlier outputs are removed)")
    from_arg(p, "redo STAGE and every later one from scratch, keep the earlier ones")
    launcher_arg(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("submit", help="submit the whole pipeline as dependent SLURM jobs and exit",
                       description="Submit one SLURM job per step (" +
                       ", ".join(name for name, _ in table.chain_steps(Config())) + " with "
                       "method psa), each starting "
                       "when the previous one succeeded; steps already done are left out. Job ids "
                       "go to out_dir/stages/submitted.json.")
    config_args(p, required=True)
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
        config_args(p, required=True)
        p.add_argument("--force", action="store_true",
                       help="redo the stage from scratch (its earlier outputs are removed)")
        if stage.kind == "labels":
            p.add_argument("--ray-address", help="run on an existing Ray cluster (same as the "
                           "override ray.address=HOST:PORT)")
        if stage.kind == "train":
            launcher_arg(p)
        p.set_defaults(func=cmd_stage, stage=stage.name)


def _add_result_commands(sub) -> None:
    p = sub.add_parser("export", help="write a run's pseudo labels, CAMs, affinity labels or "
                       "segmenter predictions as files (VOC or mmsegmentation layout)",
                       description="One file per image, named by its key: index PNGs in the "
                       "dataset's palette (class ids unchanged, 255 ignore) beside the images, "
                       "with an image list; CAMs as float16 .npy. Resumes; refuses a directory "
                       "holding other files unless --overwrite.")
    config_args(p, required=True)
    p.add_argument("--what", required=True, choices=list(table.exports()),
                   help="pseudo: the walk's pseudo labels; aff_labels (psa) or ir_labels (irn): the "
                        "labels the walk's network learned from; cams; pred: the segmenter")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--layout", default="voc", choices=list(LAYOUTS),
                   help="voc: JPEGImages/ SegmentationClassAug/ ImageSets/; mmseg: img_dir/ ann_dir/")
    p.add_argument("--split", help="split (default: data.train_split; for pred data.val_split)")
    p.add_argument("--workers", type=int, default=2, help="worker processes")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty directory")
    test_time_args(p, "pred: ")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="the trained segmenter on new images (folder, glob or "
                       "shard dataset): index PNGs and colour overlays",
                       description="Predict with the run's segmenter (out_dir/seg): a folder of "
                       "JPEG/PNG files, a glob, or a shard dataset. Writes OUT/<name>.png and "
                       "OUT/overlay/<name>.png; resumes; a corrupt file is reported and skipped. "
                       "A shard dataset with masks is scored (OUT/eval.json, eval.md).")
    config_args(p, required=True)
    p.add_argument("--input", required=True, help="folder, glob ('imgs/**/*.jpg') or dataset dir")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--split", help="a dataset's split (default data.val_split)")
    test_time_args(p)
    p.add_argument("--crf", action="store_true", help="dense CRF on the probabilities "
                   "(aff_labels.crf_* settings; needs psa-dist[crf])")
    p.add_argument("--no-ray", action="store_true", help="in this process, not on Ray actors")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("label", help="CAMs and pseudo labels for another dataset from a run's "
                       "trained classifier and AffinityNet or IRN (nothing is trained)",
                       description="The label stages of the run CONFIG, pointed at another "
                       "converted dataset: OUT becomes a run directory whose models are the run's "
                       "and whose cams/ and random_walk/ (irn_walk/ with method=irn) hold the "
                       "new data's CAMs and pseudo labels (psa-dist export them with out_dir=OUT data.root=INPUT "
                       "data.source=shards).")
    config_args(p, required=True)
    p.add_argument("--input", required=True, help="dataset directory (dataset.json + shards)")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--split", default="train", help="the dataset's split to label")
    p.set_defaults(func=cmd_label)
