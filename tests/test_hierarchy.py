"""Class trees as data (``data.hierarchy``), tree cuts, and the hierarchical metrics (HCA / MTA).

Pinned: the file's checks (one message per problem, before anything loads); a view's names,
children and sublabels on a hand-built tree; every cut's labels cover each class exactly once by
an ancestor-or-self; the evaluation cuts are distinct and seeded; HCA and MTA on a hand-made
logit matrix; and through the runner, that a tree adds hca / mta without changing the leaf
accuracy, is refused for methods that cannot score the node names, and that ProTeCt without a
tree is refused before training.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapt.config import RecipeError, load_recipe
from adapt.tasks.hierarchy import ClassTree
from adapt.run import Experiment, run_fit
from adapt.tasks import get_task
from adapt.tasks.hierarchy_metrics import HierarchicalAccuracy
from tests.conftest import CLASSES, COLOUR_TREE, tiny_overrides

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TREE = {"colour": ["warm", "cool"], "warm": ["red", "orange", "yellow"], "cool": ["green", "blue"]}
LEAVES = ["red", "orange", "yellow", "green", "blue"]


@pytest.mark.parametrize("children,message", [
    ([], "one JSON object mapping each internal node"),
    ({"a": []}, "node 'a' must map to a non-empty list"),
    ({"a": ["x", "y"], "b": ["y"]}, "'y' is a child of both 'a' and 'b'"),
    ({"a": ["x"], "b": ["y"]}, "it has 2 roots \\(a, b\\)"),
    ({"a": ["b"], "b": ["a"]}, "the tree has a cycle"),
    ({"r": ["x"], "a": ["b"], "b": ["a"]}, "nodes a, b are not under the root 'r'"),
    ({"a_b": ["x"], "a b": ["y"]}, "node 'a b' is listed twice"),
])
def test_a_malformed_tree_is_one_message(children, message):
    with pytest.raises(ValueError, match=message):
        ClassTree(children, "t.json")


def test_tree_files_and_their_classes_are_checked(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        ClassTree.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ClassTree.load(bad)
    tree = ClassTree(TREE)
    tree.check_classes(LEAVES)
    tree.check_classes(list(reversed(LEAVES)))  # the order is the dataset's
    with pytest.raises(ValueError, match="classes 'purple' are not in the tree"):
        tree.check_classes(LEAVES + ["purple"])
    with pytest.raises(ValueError, match="leaves 'blue' are not classes of this dataset"):
        tree.check_classes(LEAVES[:4])
    with pytest.raises(ValueError, match="classes 'warm' are internal nodes"):
        tree.check_classes(LEAVES + ["warm"])


def test_a_view_lists_classes_then_nodes_with_children_and_sublabels():
    view = ClassTree(TREE).over(["blue", "red", "orange", "yellow", "green"])
    assert view.names == ["blue", "red", "orange", "yellow", "green", "warm", "cool"]
    assert view.internal == ["colour", "warm", "cool"]
    assert view.children == [[5, 6], [1, 2, 3], [4, 0]]  # the file's order of children
    # per class, the child of (root, warm, cool) it lies under
    assert view.sublabels.tolist() == [[1, -1, 1], [0, 0, -1], [0, 1, -1], [0, 2, -1], [1, -1, 0]]
    assert ClassTree(TREE).over(view.names).names == view.names  # over its own names: itself
    base = ClassTree(TREE).over(["red", "orange"])  # a node left without a class drops out
    assert base.names == ["red", "orange", "warm"] and base.children == [[2], [0, 1]]


def test_cuts_cover_every_class_once_by_an_ancestor_or_itself():
    view = ClassTree({"r": ["a", "b", "z"], "a": ["a1", "a2"], "a1": ["x", "y"], "a2": ["w"], "b": ["u", "v"]}
                     ).over(["x", "y", "w", "u", "v", "z"])
    names = view.names  # x y w u v z a a1 a2 b
    cases = {  # expanded (r, a, a1, a2, b) -> labels
        (1, 1, 1, 1, 1): ["x", "y", "w", "u", "v", "z"],
        (1, 0, 1, 1, 1): ["u", "v", "z", "a"],  # under a collapsed node, nothing expands
        (1, 1, 0, 1, 0): ["w", "z", "a1", "b"],
        (0, 0, 0, 0, 0): ["z", "a", "b"],  # the root is always expanded
    }
    ancestors = {"x": {"x", "a1", "a"}, "y": {"y", "a1", "a"}, "w": {"w", "a2", "a"}, "u": {"u", "b"},
                 "v": {"v", "b"}, "z": {"z"}}
    for expanded, labels in cases.items():
        cut = view.cut(torch.tensor(expanded, dtype=torch.bool))
        got = [names[i] for i in cut.labels]
        assert sorted(got) == sorted(labels), expanded
        for c, cls in enumerate(view.classes):  # the class's label is one of its ancestors-or-self
            assert got[cut.mapping[c]] in ancestors[cls]
    assert view.random_cut(0.0).labels.tolist() == list(range(6))  # nothing collapsed: the classes
    cuts = view.evaluation_cuts()
    keys = [c.key() for c in cuts]
    # this tree has 10 distinct cuts (a: collapsed, or open with a1 and a2 each either way; b: 2)
    assert len(set(keys)) == len(keys) == 10 and keys == [c.key() for c in view.evaluation_cuts()]
    assert keys != [c.key() for c in view.evaluation_cuts(seed=1)]  # seeded: another seed, another order
    assert len(view.evaluation_cuts(n=4)) == 4


def test_hca_and_mta_on_a_hand_made_case():
    view = ClassTree(TREE).over(LEAVES)  # names: red orange yellow green blue warm cool
    cut_all = view.cut(torch.ones(3, dtype=torch.bool))  # the classes
    cut_top = view.cut(torch.zeros(3, dtype=torch.bool))  # warm, cool
    metric = HierarchicalAccuracy(view, [cut_all, cut_top])
    logits = torch.tensor([
        [5., 0, 0, 0, 0, 3, 1],  # red: right at the leaf, at the root (warm) and at warm
        [5., 0, 0, 0, 0, 1, 3],  # red: right at the leaf, wrong at the root (cool)
        [0., 0, 0, 1, 5, 0, 2],  # green predicted blue: wrong leaf; right at the root
        [0., 0, 0, 0, 5, 0, 2],  # blue: right everywhere
    ])
    metric.update(logits, torch.tensor([0, 0, 3, 4]))
    out = metric.compute()
    assert out["acc"] == pytest.approx(3 / 4)
    assert out["hca"] == pytest.approx(2 / 4)
    # the cut of the classes is the leaf accuracy; the top cut: warm/cool right for rows 0, 2, 3
    assert out["mta"] == pytest.approx((3 / 4 + 3 / 4) / 2)
    with pytest.raises(ValueError, match="logits over the tree's 7 names"):
        metric.update(logits[:, :5], torch.tensor([0, 0, 3, 4]))


def test_the_task_scores_the_nodes_only_with_a_tree():
    plain, tree = get_task("single_label"), get_task("single_label", hierarchy=str(COLOUR_TREE))
    assert plain.evaluation_classes(CLASSES) == CLASSES
    names = tree.evaluation_classes(CLASSES)
    assert names[:6] == CLASSES and names[6:] == ["warm", "cool", "greenish"]
    assert isinstance(tree.evaluator_for(names), HierarchicalAccuracy)
    assert not isinstance(plain.evaluator_for(CLASSES), HierarchicalAccuracy)
    with pytest.raises(ValueError, match="data.hierarchy configures single_label data"):
        get_task("multi_label").options_from(type("D", (), {"hierarchy": "t.json"})())


def _hier(image_folder, tmp_path, method="coop", **extra):
    over = tiny_overrides(image_folder, tmp_path, method, **{"data.hierarchy": str(COLOUR_TREE), **extra})
    return load_recipe(RECIPES / "coop/fewshot.yaml", over)


def test_a_tree_adds_hca_and_mta_and_keeps_the_leaf_accuracy(image_folder, tmp_path):
    with_tree = run_fit(_hier(image_folder, tmp_path, run_name="t", baseline="true"))
    plain = run_fit(load_recipe(RECIPES / "coop/fewshot.yaml", tiny_overrides(
        image_folder, tmp_path, "coop", run_name="p", baseline="true")))
    found = with_tree["task_metrics"]["test"]
    assert set(found) == {"acc", "hca", "mta"} and found["hca"] <= found["acc"]
    # the same images right (counts in float64 vs torchmetrics' float32: round-off only)
    assert with_tree["metrics"]["test_acc"] == pytest.approx(plain["metrics"]["test_acc"], abs=1e-5)
    assert with_tree["zeroshot_metrics"]["test_acc"] == pytest.approx(plain["zeroshot_metrics"]["test_acc"])
    saved = json.loads((tmp_path / "t" / "results.json").read_text())
    assert saved["task_metrics"]["test"] == found


def test_tree_problems_are_refused_before_training(image_folder, tmp_path):
    six = tmp_path / "five.json"
    six.write_text(json.dumps({"colour": CLASSES[:5]}))
    with pytest.raises(RecipeError, match="classes 'cyan' are not in the tree"):
        Experiment(_hier(image_folder, tmp_path, **{"data.hierarchy": str(six)}))
    with pytest.raises(RecipeError, match="linearprobe .* learns one thing per training class; drop data.hierarchy"):
        Experiment(_hier(image_folder, tmp_path, "linearprobe"))
    with pytest.raises(RecipeError, match="calip .* scores each class against the others"):
        Experiment(_hier(image_folder, tmp_path, "calip"))
    no_tree = load_recipe(RECIPES / "coop/fewshot.yaml", tiny_overrides(image_folder, tmp_path, "protect"))
    with pytest.raises(RecipeError, match="method 'protect' needs data.hierarchy: a class tree"):
        Experiment(no_tree)
