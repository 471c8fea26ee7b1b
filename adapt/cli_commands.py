"""What the CLI's sub-commands do beyond parsing: printing results, tables and predictions."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from adapt.config import load_recipe


def print_results(results: dict) -> None:
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


def test(target: str, overrides: Sequence[str]) -> None:
    from adapt import run

    path = Path(target)
    if path.is_dir():
        results = run.run_test(load_recipe(path / "recipe.yaml", overrides), run_dir=path)
    else:
        results = run.run_test(load_recipe(path, overrides))
    print_results(results)


def export(run_dir: str, out_dir: str, overwrite: bool = False, plain: bool = False) -> None:
    from adapt.export import export_run

    out = export_run(Path(run_dir), Path(out_dir), overwrite=overwrite)
    print(f"adapter written to {out}")
    if plain:
        from adapt.inference import export_plain_prompts, load_adapter

        path = export_plain_prompts(load_adapter(out, device="cpu"), out / "prompts.safetensors")
        print(f"plain prompt tensors written to {path}")


def compare(recipes: Sequence[str], seeds: Sequence[int], out: str, overrides: Sequence[str],
            executor: Optional[str] = None, jobs: Optional[int] = None, dry_run: bool = False) -> None:
    import time

    from adapt.compare import compare as run_compare
    from adapt.compare.launcher import load_launcher, split_overrides

    overrides, launcher_overrides = split_overrides(overrides)
    launcher = load_launcher(recipes, launcher_overrides, executor=executor, jobs=jobs)
    start = time.perf_counter()
    res = run_compare(recipes, seeds, out, overrides, launcher=launcher, dry_run=dry_run)
    if dry_run:
        print(f"{len(res['pending'])} runs to run ({res['reused']} finished, reused) under "
              f"--executor {launcher.executor}:")
        for job in res["pending"]:
            print(f"  {job.name}  {job.run_dir}")
        if res["sbatch"] is not None:
            print("\nsbatch script (one array task per run above, in that order; not submitted):\n")
            print(res["sbatch"])
        return
    print((Path(out) / "comparison.md").read_text())
    print(f"{res['trained']} runs trained, {len(res['records']) - res['trained']} reused, "
          f"{len(res['missing'])} failed; {time.perf_counter() - start:.0f} s")
    print("written: " + ", ".join(str(p) for p in res["files"]))


def report(targets: Sequence[str], out: str) -> None:
    from adapt.compare import report as run_report

    res = run_report(targets, out)
    print((Path(out) / "comparison.md").read_text())
    print(f"{len(res['records'])} runs; written: " + ", ".join(str(p) for p in res["files"]))


def predict(args) -> None:
    from adapt.inference import (check_maps_dir, check_predictions_path, load_adapter, predict_files,
                                 write_predictions)

    check_predictions_path(args.out)  # before any time is spent
    maps_dir = Path(args.maps_dir) if args.maps_dir else Path(args.out).with_suffix("").with_name(
        Path(args.out).stem + "_label_maps")
    classnames = _classnames(args.classnames, args.classnames_file)
    window = {"slide_window": list(args.slide_window)} if args.slide_window else None
    model = load_adapter(args.adapter, classnames=classnames, device=args.device, task=args.task,
                         task_options=window)
    if model.task.logit_grid:  # it writes label maps: their folder too, before any image is read
        check_maps_dir(maps_dir)
    rows = predict_files(model, args.images, top_k=args.top_k, batch_size=args.batch_size,
                         progress=True, maps_dir=maps_dir)
    out = write_predictions(rows, args.out)
    maps = f"; label maps in {maps_dir}" if rows and "label_map" in rows[0] else ""
    print(f"{len(rows)} images labelled with {len(model.classnames)} classes ({model.task.name}); "
          f"written to {out}{maps}")


def _classnames(inline: Optional[str], file: Optional[str]) -> Optional[list[str]]:
    if inline:
        names = [c.strip() for c in inline.split(",") if c.strip()]
    elif file:
        names = [ln.strip() for ln in Path(file).read_text().splitlines() if ln.strip()]
    else:
        return None
    if len(set(names)) != len(names):
        raise ValueError(f"class names repeat: {names}; give each class once")
    return names


def methods_table() -> str:
    """Each method: one-line description, what it trains, whether it can run on cached features."""
    from adapt.methods import get_method, list_methods

    rows = [("method", "trains", "features", "description")]
    for name in list_methods():
        cls = get_method(name)
        # the class's own docstring where a file holds several methods, else the file's
        doc = (cls.__dict__.get("__doc__") or sys.modules[cls.__module__].__doc__ or "").strip().split("\n\n")[0]
        doc = " ".join(doc.split()).split(". ")[0].rstrip(".")
        rows.append((name, trainable_kind(cls), "yes" if cls.supports_feature_cache else "no",
                     doc if len(doc) <= 100 else doc[:99] + "…"))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}" for r in rows)


def trainable_kind(cls) -> str:
    """What a method learns, as it declares it (``trainable_kind``), else from its traits."""
    kind = getattr(cls, "trainable_kind", "")
    if kind:
        return kind
    if cls.grad_at_test:
        return "per test image"
    return "class-agnostic" if cls.repointable else "per class"
