"""adapt compare / report: the four files, numbers equal to the runs' own, resume without training."""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from adapt.cli import main
from adapt.compare import compare, report
from adapt.compare.runs import expand_recipes
from adapt.config import load_recipe
from adapt.methods import get_method
from adapt.run import run_fit
from adapt.settings.base2novel import harmonic_mean
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def _tiny_recipes(tmp_path, image_folder):
    """Two seconds-long recipes (CoOp and KgCoOp, base-to-novel) over the generated colours."""
    paths = []
    for method in ("coop", "kgcoop"):
        items = dict(o.split("=", 1) for o in tiny_overrides(image_folder, tmp_path, method=method))
        items.pop("method.name")
        recipe = {"_base_": str(RECIPES / method / "base2novel.yaml")}
        for key, value in items.items():
            node = recipe
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = OmegaConf.create({"v": value}).v if value != "null" else None
        path = tmp_path / "recipes" / method / "tiny_b2n.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(recipe), path)
        paths.append(path)
    return paths


def test_compare_writes_the_four_files_from_the_runs_and_resumes_without_training(tmp_path, image_folder):
    recipes = _tiny_recipes(tmp_path, image_folder)
    out = tmp_path / "cmp"
    calls = []

    def counting_fit(recipe):
        calls.append((recipe.method.name, recipe.seed))
        return run_fit(recipe)

    res = compare(recipes, seeds=[1, 2], out=out, fit=counting_fit, progress=False)
    assert sorted(calls) == [("coop", 1), ("coop", 2), ("kgcoop", 1), ("kgcoop", 2)]
    assert [p.name for p in res["files"]] == ["comparison.md", "comparison.csv", "comparison.json",
                                              "comparison.png"]
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the expected numbers, from the individual results.json files
    runs = {}
    for method in ("coop", "kgcoop"):
        for seed in (1, 2):
            runs[method, seed] = json.loads((out / "runs" / f"{method}-tiny_b2n" / f"seed{seed}" /
                                             "results.json").read_text())
    table = json.loads((out / "comparison.json").read_text())["tables"]
    assert len(table) == 1 and table[0]["seeds"] == [1, 2]
    rows = {r["name"]: r for r in table[0]["rows"]}
    assert list(rows)[0] == "zero-shot"  # the zero-shot row first
    md = (out / "comparison.md").read_text()
    for method in ("coop", "kgcoop"):
        for key in ("base_acc", "novel_acc", "hm"):
            values = [runs[method, s]["metrics"][key] for s in (1, 2)]
            got = rows[method]["metrics"][key]
            assert got["mean"] == pytest.approx(statistics.mean(values))
            assert got["std"] == pytest.approx(statistics.stdev(values))
            assert f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" in md
        base = statistics.mean(runs[method, s]["metrics"]["base_acc"] for s in (1, 2))
        novel = statistics.mean(runs[method, s]["metrics"]["novel_acc"] for s in (1, 2))
        assert rows[method]["metrics"]["hm_of_means"]["mean"] == pytest.approx(harmonic_mean(base, novel))
        assert rows[method]["missing_seeds"] == []
    zs = runs["coop", 1]["zeroshot_metrics"]
    assert rows["zero-shot"]["metrics"]["hm"]["mean"] == pytest.approx(zs["hm"])
    assert "HM of means" in md and "per-seed harmonic means" in md and "Missing runs: none" in md
    best_hm = max(r["metrics"]["hm"]["mean"] for r in rows.values())
    assert f"**{best_hm:.1f}" in md

    csv_rows = list(csv.DictReader(open(out / "comparison.csv")))
    assert len(csv_rows) == 4
    for row in csv_rows:
        r = runs[row["method"], int(row["seed"])]
        assert float(row["hm"]) == pytest.approx(r["metrics"]["hm"])
        assert int(row["trainable_params"]) == r["trainable_params"]
        assert row["recipe_hash"] and row["adapter_dir"] == r["adapter_dir"]
    assert len({r["recipe_hash"] for r in csv_rows if r["method"] == "coop"}) == 1

    # rerunning trains nothing and writes the same table
    calls.clear()
    before = (out / "comparison.json").read_text()
    again = compare(recipes, seeds=[1, 2], out=out, fit=counting_fit, progress=False)
    assert calls == [] and again["trained"] == 0
    assert (out / "comparison.json").read_text() == before

    # another recipe into the same folders is refused, the runs are untouched
    with pytest.raises(ValueError, match="another recipe"):
        compare(recipes, seeds=[1], out=out, overrides=["optim.lr=0.5"], fit=counting_fit, progress=False)
    assert calls == []

    # report over the run folders (a glob) rebuilds the same numbers without training
    rep = tmp_path / "rep"
    assert main(["report", str(out / "runs" / "*"), "--out", str(rep)]) == 0
    assert json.loads((rep / "comparison.json").read_text())["tables"] == table


def test_report_states_missing_seeds(tmp_path, image_folder):
    recipes = _tiny_recipes(tmp_path, image_folder)
    out = tmp_path / "cmp"
    compare(recipes[:1], seeds=[1, 2], out=out, progress=False)
    compare(recipes[1:], seeds=[1], out=out, progress=False)
    report([str(out / "runs")], out=tmp_path / "rep")
    md = (tmp_path / "rep" / "comparison.md").read_text()
    assert "Missing runs: kgcoop: seed 2." in md
    rows = json.loads((tmp_path / "rep" / "comparison.json").read_text())["tables"][0]["rows"]
    assert {r["name"]: r["missing_seeds"] for r in rows}["kgcoop"] == [2]


def test_standard_comparison_lists_every_base2novel_recipe():
    listed = {p.resolve() for p in expand_recipes([RECIPES / "compare" / "base2novel.yaml"])}
    # a recipe that starts from an earlier run (method.init_from: PLOT's joint stage, SubPT's
    # subspace stage) is chained
    # by hand, not compared standalone; the comparison's comment says so
    chained = {p.resolve() for p in RECIPES.glob("*/base2novel.yaml")
               if p.parent.name != "compare" and "init_from" in load_recipe(p).method}
    assert chained == {(RECIPES / m / "base2novel.yaml").resolve() for m in ("plot", "subpt")}
    # a method that needs data a comparison does not have (ProTeCt's class tree) is run on such data
    needs = {p.resolve() for p in RECIPES.glob("*/base2novel.yaml")
             if p.parent.name != "compare" and get_method(load_recipe(p).method.name).requires_data}
    assert needs == {(RECIPES / m / "base2novel.yaml").resolve() for m in ("protect", "protect_maple")}
    assert listed == {p.resolve() for p in RECIPES.glob("*/base2novel.yaml")
                      if p.parent.name != "compare"} - chained - needs


def test_compare_logs_its_table_to_wandb_when_on(tmp_path, image_folder, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "cmp"
    compare(_tiny_recipes(tmp_path, image_folder)[:1], seeds=[1], out=out, overrides=["logger.wandb=true"],
            progress=False)
    tables = list((out / "wandb").glob("offline-run-*/files/media/table/comparison_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    rows = list(csv.DictReader(open(out / "comparison.csv")))
    assert table["columns"] == list(rows[0])
    hm = table["columns"].index("hm")
    assert [float(r[hm]) for r in table["data"]] == [float(r["hm"]) for r in rows]


def test_an_interrupted_comparison_resumes_only_the_unfinished_run(tmp_path, image_folder):
    recipes = _tiny_recipes(tmp_path, image_folder)[:1]
    out = tmp_path / "cmp"
    compare(recipes, seeds=[1, 2], out=out, progress=False)
    run2 = out / "runs" / "coop-tiny_b2n" / "seed2"
    before = json.loads((run2 / "results.json").read_text())
    (run2 / "results.json").unlink()  # as if stopped after its last checkpoint, before results
    calls = []

    def fit(recipe):
        calls.append((recipe.seed, recipe.resume))
        return run_fit(recipe)

    res = compare(recipes, seeds=[1, 2], out=out, fit=fit, progress=False)
    assert calls == [(2, True)] and res["trained"] == 1
    after = json.loads((run2 / "results.json").read_text())
    assert after["metrics"] == pytest.approx(before["metrics"])


def test_any_metric_or_named_scalar_in_results_becomes_a_column(tmp_path):
    from adapt.compare.runs import RunRecord
    from adapt.compare.table import aggregate, markdown

    def rec(method, seed, acc, **scalars):
        return RunRecord(tmp_path / f"{method}{seed}", {
            "method": method, "dataset": "d", "setting": "all", "shots": 16, "seed": seed,
            "metrics": {"test_acc": acc}, "scalars": scalars, "trainable_params": 10,
            "timing": {"fit_seconds": 1.0}}, recipe_hash=method)

    records = [rec("tipadapter", 1, 70.0, alpha=1.5), rec("tipadapter", 2, 74.0, alpha=2.5),
               rec("linearprobe", 1, 80.0), rec("linearprobe", 2, 60.0)]
    (group,) = aggregate(records)
    assert group.columns == ["test_acc", "alpha"]
    rows = {r.name: r for r in group.rows}
    assert rows["tipadapter"].stats["alpha"].mean == pytest.approx(2.0)
    md = markdown([group])
    assert "| tipadapter | **72.0 ± 2.8** | 2.0 ± 0.7 |" in md  # alpha has no "best"
    assert "| linearprobe | 70.0 ± 14.1 | – |" in md and "HM of means" not in md


def test_segmentation_and_multi_label_scores_lead_the_table_and_have_a_best(tmp_path):
    from adapt.compare.plot import _headline
    from adapt.compare.runs import RunRecord
    from adapt.compare.table import aggregate, markdown

    def rec(method, dataset, metrics, seed=1):
        return RunRecord(tmp_path / f"{method}{dataset}", {
            "method": method, "dataset": dataset, "setting": "all", "shots": 0, "seed": seed,
            "metrics": metrics, "scalars": {"alpha": 1.0}, "trainable_params": 10,
            "timing": {"fit_seconds": 1.0}}, recipe_hash=method)

    groups = {g.dataset: g for g in aggregate([
        rec("maskclip", "seg", {"test_miou": 9.7}), rec("denseclip", "seg", {"test_miou": 12.5}),
        rec("dualcoop", "ml", {"test_map": 46.8}), rec("taidpt", "ml", {"test_map": 40.0})])}
    assert groups["seg"].columns == ["test_miou", "alpha"] and _headline(groups["seg"]) == "test_miou"
    assert _headline(groups["ml"]) == "test_map"
    md = markdown([groups["seg"], groups["ml"]])
    assert "| method | test mIoU | alpha |" in md and "| denseclip | **12.5** |" in md
    assert "| dualcoop | **46.8** |" in md and "| maskclip | 9.7 |" in md
