"""``adapt fit | test | export | methods`` — the command line over recipes and run directories."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from adapt.checkpointing import RunInterrupted
from adapt.config import RecipeError, load_recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adapt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="train (if the method trains) and evaluate a recipe")
    fit.add_argument("recipe")
    fit.add_argument("overrides", nargs="*", help="key=value, e.g. data.shots=4 method.n_ctx=8")
    test = sub.add_parser("test", help="evaluate a recipe, or a finished run directory")
    test.add_argument("target", help="a recipe YAML or a run directory")
    test.add_argument("overrides", nargs="*")
    export = sub.add_parser("export", help="write a run's adapter to a directory")
    export.add_argument("run_dir")
    export.add_argument("out_dir")
    export.add_argument("--overwrite", action="store_true", help="replace an adapter already in out_dir")
    sub.add_parser("methods", help="list the registered methods")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Lightning's INFO banners (device summary, tips) drown the results on a terminal
    for name in ("pytorch_lightning", "pytorch_lightning.utilities.rank_zero", "lightning_fabric",
                 "lightning_fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return _dispatch(args)
    except RunInterrupted as err:
        print(f"\nadapt {args.command}: {err}", file=sys.stderr)
        if "checkpoint after epoch" in str(err):
            print(f"resume with: {_resume_command(args)}", file=sys.stderr)
        return err.exit_code
    except (RecipeError, FileNotFoundError, ValueError, KeyError, TypeError, RuntimeError) as err:
        print(f"adapt {args.command}: error: {err}", file=sys.stderr)
        return 2


def _dispatch(args) -> int:
    from adapt import run

    if args.command == "methods":
        from adapt.methods import list_methods

        print("\n".join(list_methods()))
        return 0
    if args.command == "fit":
        _report(run.run_fit(load_recipe(args.recipe, args.overrides)))
        return 0
    if args.command == "test":
        target = Path(args.target)
        if target.is_dir():
            results = run.run_test(load_recipe(target / "recipe.yaml", args.overrides), run_dir=target)
        else:
            results = run.run_test(load_recipe(target, args.overrides))
        _report(results)
        return 0
    if args.command == "export":
        from adapt.export import export_run

        out = export_run(Path(args.run_dir), Path(args.out_dir), overwrite=args.overwrite)
        print(f"adapter written to {out}")
        return 0
    return 1


def _resume_command(args) -> str:
    import shlex

    kept = [o for o in args.overrides if not o.startswith(("resume=", "overwrite="))]
    return shlex.join(["adapt", "fit", args.recipe, *kept, "resume=true"])


def _report(results: dict) -> None:
    from pytorch_lightning.utilities import rank_zero_only

    if rank_zero_only.rank != 0:  # under DDP every process runs the CLI; one report is enough
        return
    m = results["metrics"]
    zs = results.get("zeroshot_metrics")
    print(f"\n{results['method']} on {results['dataset']} ({results['setting']}, "
          f"{results['shots']} shots, seed {results['seed']})")
    for key, value in m.items():
        base = f"   (zero-shot {zs[key]:.2f})" if zs and key in zs else ""
        print(f"  {key:>9}: {value:6.2f}{base}")
    if results.get("run_dir"):
        print(f"  run directory: {results['run_dir']}")
        if results.get("adapter_dir"):
            print(f"  adapter: {results['adapter_dir']}")


if __name__ == "__main__":
    raise SystemExit(main())
