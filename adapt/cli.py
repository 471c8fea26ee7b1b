"""adapt: parameter-efficient transfer learning for frozen CLIP models.

  adapt fit RECIPE [key=value ...]           train and evaluate (adapt fit --help: every key)
  adapt compare RECIPE... --seeds 1 2 3      many recipes x seeds -> comparison.md/.csv/.json/.png
  adapt report RUN_DIR_OR_GLOB...            the same files from finished runs
  adapt predict ADAPTER IMAGES_OR_FOLDER     classify images with an exported adapter
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from adapt.structured import RecipeError

# the recipe machinery (torch, open_clip, Lightning: seconds to import) is imported in main, after
# `adapt compare --executor ray` has started its cluster, so the two overlap

OVERRIDES_HELP = "key=value, e.g. data.shots=4 method.n_ctx=8 (see `adapt fit --help`)"


def build_parser() -> argparse.ArgumentParser:
    from adapt.version import __version__
    from adapt.cli_help import recipe_keys_help

    parser = argparse.ArgumentParser(prog="adapt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"adapt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    raw = argparse.RawDescriptionHelpFormatter
    fit = sub.add_parser("fit", help="train (if the method trains) and evaluate a recipe",
                         epilog=recipe_keys_help(), formatter_class=raw)
    fit.add_argument("recipe")
    fit.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    test = sub.add_parser("test", help="evaluate a recipe, or a finished run directory")
    test.add_argument("target", help="a recipe YAML or a run directory")
    test.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    export = sub.add_parser("export", help="write a run's adapter to a directory")
    export.add_argument("run_dir")
    export.add_argument("out_dir")
    export.add_argument("--overwrite", action="store_true", help="replace an adapter already in out_dir")
    export.add_argument("--plain", action="store_true",
                        help="also write prompts.safetensors: plain tensors loadable with torch + safetensors")
    cmp = sub.add_parser("compare", help="run recipes x seeds and write comparison.md/.csv/.json/.png",
                         description="Runs every recipe x seed (finished runs under OUT/runs are reused, so an "
                                     "interrupted comparison resumes), then writes OUT/comparison.{md,csv,json,png}. "
                                     "A recipe may be a list file (recipes/compare/base2novel.yaml).")
    cmp.add_argument("recipes", nargs="+", metavar="RECIPE")
    cmp.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    cmp.add_argument("--out", default="comparison", help="output folder (default: ./comparison)")
    cmp.add_argument("--executor", choices=("local", "ray", "slurm"), default=None,
                     help="where the runs execute: here one after another (local, the default), as Ray "
                          "tasks, or as a SLURM job array (submitit); the list file's launcher: section "
                          "and launcher.KEY=VALUE set the rest")
    cmp.add_argument("--jobs", type=int, default=None, help="runs at once (ray; slurm: the array's parallelism)")
    cmp.add_argument("--dry-run", action="store_true",
                     help="list the runs that would run (slurm: print the sbatch script); run nothing")
    cmp.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                     help=OVERRIDES_HELP + "; applied to every recipe, anywhere on the line")
    rep = sub.add_parser("report", help="comparison files from finished runs, without training")
    rep.add_argument("targets", nargs="+", metavar="RUN_DIR_OR_GLOB")
    rep.add_argument("--out", default=".", help="output folder (default: the working directory)")
    pred = sub.add_parser("predict", help="label images with an adapter: a CSV of top-k labels (and label maps)")
    pred.add_argument("adapter", help="an adapter directory (run_dir/adapter or `adapt export` output)")
    pred.add_argument("images", nargs="+", metavar="IMAGES_OR_FOLDER")
    names = pred.add_mutually_exclusive_group()
    names.add_argument("--classnames", help="comma-separated class names (default: the adapter's own)")
    names.add_argument("--classnames-file", help="a text file with one class name per line")
    names.add_argument("--task", help="an adapter trained on several datasets (multi_task): the task to classify")
    pred.add_argument("--top-k", type=int, default=5)
    pred.add_argument("--out", default="predictions.csv")
    pred.add_argument("--maps-dir", default=None,
                      help="segmentation adapters: the folder of label-map PNGs (default: <out>_label_maps)")
    pred.add_argument("--slide-window", type=int, nargs=2, metavar=("CROP", "STRIDE"), default=None,
                      help="segmentation adapters: slide a CROP window every STRIDE pixels (default: "
                           "the run's data.slide_window, recorded in the adapter; else whole images)")
    pred.add_argument("--batch-size", type=int, default=64)
    pred.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    config = sub.add_parser("config", help="print the resolved recipe (defaults + file + overrides)")
    config.add_argument("recipe")
    config.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    sub.add_parser("methods", help="list the registered methods: what they learn, on what inputs")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = []
    if argv[:1] == ["compare"]:
        # key=value anywhere (also after --seeds 1 2) is an override, never a recipe or a seed
        overrides = [a for a in argv[1:] if "=" in a and not a.startswith("-")]
        argv = [argv[0]] + [a for a in argv[1:] if "=" not in a or a.startswith("-")]
    args = build_parser().parse_args(argv)
    if args.command == "compare":
        args.overrides = overrides
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Lightning's INFO banners (device summary, tips) drown the results on a terminal
    for name in ("pytorch_lightning", "pytorch_lightning.utilities.rank_zero", "lightning_fabric",
                 "lightning_fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.command == "compare" and not args.dry_run:
        _prestart_cluster(args)
    from adapt.checkpointing import RunInterrupted

    try:
        return _dispatch(args)
    except RunInterrupted as err:
        print(f"\nadapt {args.command}: {err}", file=sys.stderr)
        if "checkpoint after epoch" in str(err) and args.command == "fit":
            print(f"resume with: {_resume_command(args)}", file=sys.stderr)
        return err.exit_code
    except (RecipeError, FileNotFoundError, FileExistsError, ValueError, KeyError, TypeError, RuntimeError) as err:
        print(f"adapt {args.command}: error: {err}", file=sys.stderr)
        return 2


def _prestart_cluster(args) -> None:
    """Under ``--executor ray`` (or a list file's launcher section saying so): the local Ray
    cluster and its workers' imports start now, while this process imports and plans."""
    from adapt.compare.launcher import load_launcher, split_overrides
    from adapt.compare.ray_cluster import prestart

    try:
        launcher = load_launcher(args.recipes, split_overrides(args.overrides)[1], executor=args.executor,
                                 jobs=args.jobs)
    except Exception:  # noqa: BLE001  the comparison reads it again and reports what is wrong
        return
    prestart(launcher)


def _dispatch(args) -> int:
    from adapt import cli_commands as commands
    from adapt.config import load_recipe

    if args.command == "fit":
        from adapt import run

        commands.print_results(run.run_fit(load_recipe(args.recipe, args.overrides)))
    elif args.command == "test":
        commands.test(args.target, args.overrides)
    elif args.command == "export":
        commands.export(args.run_dir, args.out_dir, overwrite=args.overwrite, plain=args.plain)
    elif args.command == "compare":
        from adapt.compare import ray_cluster

        try:
            commands.compare(args.recipes, args.seeds, args.out, args.overrides, executor=args.executor,
                             jobs=args.jobs, dry_run=args.dry_run)
        finally:
            ray_cluster.stop()  # a prestarted cluster the comparison never reached (all reused, an error)
    elif args.command == "report":
        commands.report(args.targets, args.out)
    elif args.command == "predict":
        commands.predict(args)
    elif args.command == "config":
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(load_recipe(args.recipe, args.overrides)), end="")
    elif args.command == "methods":
        print(commands.methods_table())
    return 0


def _resume_command(args) -> str:
    import shlex

    kept = [o for o in args.overrides if not o.startswith(("resume=", "overwrite="))]
    return shlex.join(["adapt", "fit", args.recipe, *kept, "resume=true"])


if __name__ == "__main__":
    raise SystemExit(main())
