"""The shape of the core: one data path (the engine and the runner never branch on images vs
features), a method is one class plus one decorator, and a checkpoint alone rebuilds a run."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from adapt.cli import main
from adapt.config import load_recipe
from adapt.engine import AdaptModule
from adapt.export import load_adapter
from adapt.methods import HandWrittenClassifier, register_method
from adapt.run import Experiment
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
WEIGHTS = ROOT / "adapt" / "weights" / "tiny-vit-p4-world.safetensors"
# what a branch on the kind of input would have to mention
INPUT_WORDS = {"features", "images", "inputs", "supports_feature_cache", "forward_features", "is_features",
               "FeatureData", "grad_at_test"}


def _branch_tests(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.IfExp, ast.While)):
            yield node.test
        elif isinstance(node, ast.comprehension):
            yield from node.ifs
        elif isinstance(node, ast.BoolOp):
            yield node


def _mentions(test: ast.AST) -> set[str]:
    words = set()
    for node in ast.walk(test):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            words.add(node.value)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, ast.Name):
            words.add(node.id)
    return words & INPUT_WORDS


@pytest.mark.parametrize("module", ["engine.py", "run.py"])
def test_engine_and_runner_never_branch_on_images_or_features(module):
    source = (ROOT / "adapt" / module).read_text()
    tree = ast.parse(source)
    offending = [(test.lineno, sorted(_mentions(test))) for test in _branch_tests(tree) if _mentions(test)]
    assert not offending, f"adapt/{module} branches on the kind of input at {offending}"
    assert "forward_features" not in source and "FeatureData" not in source


# ------------------------------------------------------------------ a method in a test file ----
@dataclass
class ScaledConfig:
    init: float = 1.0  # the learned temperature's start


@register_method("test_scaled_zeroshot")
class ScaledZeroShot(HandWrittenClassifier):
    """Zero-shot CLIP with one learned logit multiplier: the smallest trainable method."""

    Config = ScaledConfig
    supports_feature_cache = True
    trainable_kind = "one logit scale"  # `adapt methods` lists it while this module is imported

    def __init__(self, config, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        self.scale = nn.Parameter(torch.tensor(float(config.init)))
        self.rebuild_classes()

    def forward_features(self, image_features):
        return self.scale * self.backbone.logits(image_features, self.text_features)

    def scalars(self):
        return {"scale": float(self.scale.detach())}


@pytest.mark.skipif(not WEIGHTS.exists(), reason="run experiments/pretrain_world.py first")
def test_a_method_defined_in_a_test_file_runs_fit_export_load_through_the_cli(image_folder, tmp_path):
    over = tiny_overrides(image_folder, tmp_path, "test_scaled_zeroshot", **{
        "backbone.name": "tiny-vit-p4", "backbone.pretrained": "world", "optim.lr": 0.5,
        "optim.warmup_epochs": 0, "run_name": "scaled"})
    assert main(["fit", str(RECIPES / "coop/fewshot.yaml"), *over]) == 0
    run = tmp_path / "scaled"
    assert main(["export", str(run), str(tmp_path / "exported")]) == 0
    loaded = load_adapter(tmp_path / "exported").eval()
    trained = float(loaded.scale)
    assert trained != 1.0  # it trained, through the ordinary engine
    import json
    assert json.loads((run / "results.json").read_text())["scalars"] == {"scale": pytest.approx(trained)}

    # the run's checkpoint alone rebuilds the Lightning module: method, classes, backbone
    rebuilt = AdaptModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt", weights_only=False)
    rebuilt.eval()
    assert rebuilt.method.name == "test_scaled_zeroshot" and rebuilt.method.classnames == loaded.classnames
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rebuilt(images), loaded.predict(images), atol=1e-6)


def test_experiment_uses_one_data_module_for_either_input(image_folder, tmp_path):
    over = tiny_overrides(image_folder, tmp_path, "coop", **{"method.n_ctx": 2})
    cached = Experiment(load_recipe(RECIPES / "coop/fewshot.yaml", over))
    plain = Experiment(load_recipe(RECIPES / "coop/fewshot.yaml", over + ["cache=false"]))
    vp = Experiment(load_recipe(RECIPES / "vp/fewshot.yaml", tiny_overrides(image_folder, tmp_path, "vp")))
    assert (cached.inputs, plain.inputs, vp.inputs) == ("features", "images", "images")
    assert type(cached.data) is type(plain.data)
    x, _ = next(iter(cached.data.train_dataloader()))
    y, _ = next(iter(plain.data.train_dataloader()))
    assert x.dim() == 2 and y.dim() == 4


# ------------------------------------------------------------------ the direction of imports ---
def _import_graph() -> dict[str, set[str]]:
    """adapt's modules -> the adapt modules they import, function-level imports included."""
    mods = {}
    for path in (ROOT / "adapt").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("adapt"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    target = sub if sub in mods else node.module
                    if target in mods and target != m:
                        graph[m].add(target)
            elif isinstance(node, ast.Import):
                graph[m] |= {a.name for a in node.names if a.name in mods and a.name != m}
    return graph


LAYERS = {  # cli -> run -> engine -> methods -> backbone; data, settings and tasks beside them
    "backbone": ("adapt.backbone", "adapt.dense", "adapt.text_prefix", "adapt.fused_blocks",
                 "adapt.split_attention", "adapt.fast_dropout"),
    "methods": ("adapt.methods",), "engine": ("adapt.engine",), "run": ("adapt.run",), "cli": ("adapt.cli",),
    "data": ("adapt.data",), "settings": ("adapt.settings",), "tasks": ("adapt.tasks",),
}
NEVER = {  # a layer -> what it must never import
    "backbone": {"methods", "engine", "run", "cli", "data", "settings", "tasks"},
    "methods": {"engine", "run", "cli", "settings"},
    "engine": {"run", "cli"},
    "data": {"methods", "engine", "run", "cli", "settings", "tasks"},
    "settings": {"engine", "run", "cli"},
    "tasks": {"backbone", "methods", "engine", "run", "cli", "data", "settings"},
}


def _layer(module: str):
    for layer, prefixes in LAYERS.items():
        if any(module == p or module.startswith((p + ".", p + "_")) for p in prefixes):
            return layer
    return None


def test_no_module_imports_itself_through_others():
    graph, seen, cycles = _import_graph(), set(), []

    def visit(node, path):
        if node in path:
            cycles.append(path[path.index(node):] + [node])
            return
        if node in seen:
            return
        path.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt, path)
        path.pop()
        seen.add(node)

    for module in sorted(graph):
        visit(module, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_imports_point_down_the_layers():
    bad = [(m, t) for m, targets in _import_graph().items() for t in targets
           if _layer(m) and _layer(t) in NEVER.get(_layer(m), set())]
    assert not bad, f"imports against the direction cli -> run -> engine -> methods -> backbone: {sorted(bad)}"
    # the data module composes data and settings, so it lives above both
    assert "adapt.settings" in _import_graph()["adapt.datamodule"]
