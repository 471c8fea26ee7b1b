"""Recipes: typed, validated, with errors that name the key and suggest the fix."""
from __future__ import annotations

from pathlib import Path

import pytest

from adapt.config import RecipeError, load_recipe, method_config_of

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_misspelled_key_is_rejected_with_a_suggestion():
    with pytest.raises(RecipeError, match=r"unknown key 'data.shtos'.*Did you mean 'data.shots'"):
        load_recipe(RECIPES / "coop/fewshot.yaml", ["data.shtos=4"])


def test_misspelled_method_key_suggests_the_method_field():
    with pytest.raises(RecipeError, match=r"n_ctxx.*Did you mean 'n_ctx'"):
        load_recipe(RECIPES / "coop/fewshot.yaml", ["method.n_ctxx=4"])


def test_wrong_type_names_the_key():
    with pytest.raises(RecipeError, match="data.shots"):
        load_recipe(RECIPES / "coop/fewshot.yaml", ["data.shots=many"])


def test_unknown_method_suggests_closest():
    with pytest.raises(RecipeError, match="Did you mean 'coop'"):
        load_recipe(RECIPES / "coop/fewshot.yaml", ["method.name=cop"])


def test_invalid_value_is_rejected():
    with pytest.raises(RecipeError, match="class_token_position"):
        load_recipe(RECIPES / "coop/fewshot.yaml", ["method.class_token_position=side"])


def test_base_include_and_overrides_resolve_to_typed_config():
    recipe = load_recipe(RECIPES / "coop/base2novel.yaml", ["seed=3", "method.csc=true"])
    assert recipe.data.setting == "base2novel" and recipe.seed == 3
    cfg = method_config_of(recipe)
    assert (cfg.n_ctx, cfg.ctx_init, cfg.csc) == (4, "a photo of a", True)
    assert recipe.optim.lr == 0.002 and recipe.trainer.max_epochs == 200


def test_coop_recipe_matches_paper_settings():
    recipe = load_recipe(RECIPES / "coop/fewshot.yaml")
    cfg = method_config_of(recipe)
    assert (cfg.n_ctx, cfg.ctx_init, cfg.csc, cfg.class_token_position) == (16, "", False, "end")
    o = recipe.optim
    assert (o.name, o.lr, o.momentum, o.weight_decay, o.warmup_epochs, o.warmup_lr) == (
        "sgd", 0.002, 0.9, 0.0005, 1, 1e-5)
    assert recipe.data.batch_size == 32 and recipe.data.shots == 16


def test_switching_method_on_the_command_line_keeps_shared_settings():
    # coop's n_ctx/ctx_init carry over to cocoop; zeroshot has neither, so they are dropped
    cocoop = load_recipe(RECIPES / "coop/base2novel.yaml", ["method.name=cocoop"])
    assert cocoop.method.name == "cocoop" and cocoop.method.n_ctx == 4
    assert cocoop.method.ctx_init == "a photo of a"
    zs = load_recipe(RECIPES / "coop/base2novel.yaml", ["method.name=zeroshot"])
    assert set(zs.method.keys()) == {"name", "templates", "ensemble"}
    # keys typed on the command line are still checked against the new method
    with pytest.raises(RecipeError, match="unknown key 'n_ctx'"):
        load_recipe(RECIPES / "coop/base2novel.yaml", ["method.name=zeroshot", "method.n_ctx=4"])
