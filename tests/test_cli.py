"""The CLI explains itself: fit --help lists every section's keys with defaults and docs,
config prints a resolved recipe, methods describes each method, --version; every recipe loads."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import adapt
from adapt.cli import main
from adapt.config import Recipe, load_recipe
from adapt.methods import get_method, list_methods

ROOT = Path(__file__).resolve().parents[1]


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_fit_help_lists_a_key_of_every_section_with_default_and_doc(capsys):
    text = _help(capsys, "fit", "--help")
    for f in dataclasses.fields(Recipe):
        if f.name == "method":
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            first = dataclasses.fields(default)[0].name
            assert f"\n  {f.name}.{first}=" in text, f.name
        else:
            assert f"\n  {f.name}=" in text, f.name
    # defaults and the dataclasses' own comments, one line each
    assert "data.shots=16" in text and "K images per class for training" in text
    assert "logger.mode=offline" in text and "wandb mode: offline | online | disabled" in text
    for name in list_methods():  # the method section: every method with its keys
        assert f"\n  {name}: " in text
    assert "csc=false" in text


def test_config_prints_the_resolved_recipe(capsys):
    assert main(["config", str(ROOT / "recipes/coop/base2novel.yaml"), "data.shots=4"]) == 0
    cfg = OmegaConf.create(capsys.readouterr().out)
    assert cfg.data.shots == 4 and cfg.data.setting == "base2novel" and cfg.method.n_ctx == 4
    assert cfg.optim.lr == 0.002  # from the _base_ include


def test_methods_table_describes_every_method(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["method", "trains", "features", "description"]
    rows = {ln.split()[0]: ln for ln in lines[1:]}
    assert sorted(rows) == list_methods()
    for name, line in rows.items():
        cls = get_method(name)
        assert cls.trainable_kind and cls.trainable_kind in line
        assert f"  {'yes' if cls.supports_feature_cache else 'no'} " in line
    assert "Tip-Adapter (Zhang et al., ECCV 2022)" in rows["tipadapter"]


def test_version(capsys):
    assert _help(capsys, "--version").strip() == f"adapt {adapt.__version__}"


def test_compare_takes_overrides_anywhere_on_the_line(monkeypatch, tmp_path):
    seen = {}
    import adapt.cli_commands as commands

    monkeypatch.setattr(commands, "compare", lambda r, s, o, ov, **kw: seen.update(r=r, s=s, o=o, ov=ov, **kw))
    assert main(["compare", "a.yaml", "b.yaml", "data.shots=4", "--seeds", "1", "2", "optim.lr=0.1",
                 "--out", str(tmp_path)]) == 0
    assert seen == {"r": ["a.yaml", "b.yaml"], "s": [1, 2], "o": str(tmp_path),
                    "ov": ["data.shots=4", "optim.lr=0.1"], "executor": None, "jobs": None, "dry_run": False}
    # the executor's flags, and launcher.KEY=VALUE among the overrides (split off by the command)
    seen.clear()
    assert main(["compare", "a.yaml", "--executor", "ray", "launcher.threads=2", "--jobs", "3", "--dry-run"]) == 0
    assert (seen["executor"], seen["jobs"], seen["dry_run"], seen["ov"]) == ("ray", 3, True, ["launcher.threads=2"])


RECIPE_FILES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if p.parent.name != "compare")


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_recipe_in_the_repo_loads_into_a_valid_config(path):
    recipe = load_recipe(path)
    assert recipe.method.name in list_methods()
    # the method section is the method's own Config, complete
    keys = {f.name for f in dataclasses.fields(get_method(recipe.method.name).Config)}
    assert set(recipe.method) == keys | {"name"}
