"""data.setting=multi_task: several datasets as one training set, evaluated task by task."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adapt.config import RecipeError, load_recipe
from adapt.data import DataConfig
from adapt.data.fewshot import few_shot_splits
from adapt.data.registry import build_dataset
from adapt.datamodule import AdaptDataModule
from adapt.engine import AdaptModule
from adapt.export import load_adapter
from adapt.run import run_fit
from adapt.settings import get_setting
from adapt.tasks.single_label import own_task_logits, task_ids
from tests.conftest import CLASSES, tiny_overrides, write_image_folder

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
FIRST, SECOND = sorted(CLASSES[:3]), sorted(CLASSES[3:])  # imagefolder sorts its classes


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tasks")
    return (write_image_folder(root / "first", FIRST, seed=1), write_image_folder(root / "second", SECOND, seed=2))


def data_config(two_tasks, **kw) -> DataConfig:
    first, second = two_tasks
    fields = dict(dataset="imagefolder", root=str(first), setting="multi_task", shots=2, num_workers=0,
                  tasks=[{"dataset": "imagefolder", "root": str(second), "name": "second"}])
    fields.update(kw)
    return DataConfig(**fields)


def datamodule(cfg: DataConfig, seed: int = 1) -> AdaptDataModule:
    dm = AdaptDataModule(cfg, 32, None, None, seed=seed)
    dm.setup()
    return dm


def test_each_task_is_sampled_as_its_own_run_would_and_joined_with_offsets(two_tasks):
    dm = datamodule(data_config(two_tasks))
    assert dm.train_classnames == FIRST + SECOND
    assert dm.class_tasks == ["imagefolder"] * 3 + ["second"] * 3
    alone = {}
    for t, root in enumerate(two_tasks):
        ds = build_dataset(DataConfig(dataset="imagefolder", root=str(root)))
        train, _ = few_shot_splits(ds, 2, 1)
        alone.update({str((root / it.path).resolve()): it.label + 3 * t for it in train})
    assert {it.path: it.label for it in dm.train_items} == alone
    # one evaluation set per task: its own classes, its own labels, every test image of it
    assert list(dm.eval_sets) == ["imagefolder", "second"]
    names, items = dm.eval_sets["second"]
    assert names == SECOND and sorted({it.label for it in items}) == [0, 1, 2] and len(items) == 18
    assert all(Path(it.path).is_relative_to(two_tasks[1].resolve()) for it in items)
    assert dm.eval_tasks == {"imagefolder": "imagefolder", "second": "second"}


def test_per_task_base_to_novel_trains_on_every_base_half(two_tasks):
    dm = datamodule(data_config(two_tasks, multi_task={"base2novel": True}))
    # ceil(3/2) = 2 base classes per task
    assert dm.train_classnames == FIRST[:2] + SECOND[:2]
    assert dm.class_tasks == ["imagefolder"] * 2 + ["second"] * 2
    assert sorted({it.label for it in dm.train_items}) == [0, 1, 2, 3]
    assert {k: v[0] for k, v in dm.eval_sets.items()} == {
        "imagefolder_base": FIRST[:2], "imagefolder_novel": FIRST[2:],
        "second_base": SECOND[:2], "second_novel": SECOND[2:]}


def test_results_are_named_per_task_with_their_mean():
    summarize = get_setting("multi_task").summarize
    assert summarize({"a": 60.0, "b": 40.0}) == {"a_acc": 60.0, "b_acc": 40.0, "test_acc": 50.0}
    out = summarize({"a_base": 80.0, "a_novel": 60.0, "b_base": 60.0, "b_novel": 40.0})
    assert out["a_hm"] == pytest.approx(2 * 80 * 60 / 140) and out["b_novel_acc"] == 40.0
    # the average row: the harmonic mean of the mean base and mean novel accuracies
    assert out["base_acc"] == 70.0 and out["novel_acc"] == 50.0
    assert out["hm"] == pytest.approx(2 * 70 * 50 / 120)


def test_own_task_logits_are_a_softmax_over_the_task_alone():
    torch.manual_seed(0)
    logits, labels = torch.randn(4, 5), torch.tensor([0, 3, 4, -1])
    ids = task_ids(["a", "a", "a", "b", "b"])
    assert ids.tolist() == [0, 0, 0, 1, 1]
    masked = own_task_logits(logits, labels, ids)
    expected = torch.stack([F.cross_entropy(logits[0, :3], labels[0]),
                            F.cross_entropy(logits[1, 3:], labels[1] - 3),
                            F.cross_entropy(logits[2, 3:], labels[2] - 3)])
    torch.testing.assert_close(F.cross_entropy(masked[:3], labels[:3], reduction="none"), expected)
    assert torch.equal(masked[3], logits[3])  # an unlabelled image keeps every class


def test_the_engine_scores_a_per_task_batch_against_its_own_tasks_classes(two_tasks, tiny_backbone):
    recipe = load_recipe(RECIPES / "coop" / "fewshot.yaml",
                         ["data.setting=multi_task", "data.tasks=[x]", "data.multi_task.classifier=per_task"])
    names = FIRST + SECOND
    tasks = ["a"] * 3 + ["b"] * 3
    module = AdaptModule.from_recipe(recipe, names, ["a photo of a {}."], backbone=tiny_backbone, class_tasks=tasks)
    module.log = lambda *a, **k: None  # outside a Trainer
    module._check_finite = lambda loss: None
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 2, 3, 5])
    loss = module.training_step((x, y), 0)
    logits = module.method(x)
    expected = (F.cross_entropy(logits[:2, :3], y[:2]) * 2 + F.cross_entropy(logits[2:, 3:], y[2:] - 3) * 2) / 4
    torch.testing.assert_close(loss, expected)
    union = AdaptModule.from_recipe(load_recipe(RECIPES / "coop" / "fewshot.yaml", ["data.setting=multi_task",
                                                                                   "data.tasks=[x]"]),
                                    names, ["a photo of a {}."], backbone=tiny_backbone, class_tasks=tasks)
    assert union.task_ids is None and module.method.class_tasks == tasks


@pytest.mark.parametrize("kw,message", [
    ({"tasks": []}, "needs data.tasks"),
    ({"setting": "all"}, "data.setting=multi_task"),
    ({"tasks": ["imagefolder"]}, "two tasks are named 'imagefolder'"),
    ({"tasks": [{"dataset": "imagefolder", "name": "x_base"}]}, "ends in _base"),
    ({"tasks": [{"dataset": "imagefolder", "roots": "/x"}]}, "keys dataset, root"),
    ({"multi_task": {"classifier": "shared"}}, "union, per_task"),
])
def test_bad_task_lists_are_refused_with_the_fix(two_tasks, kw, message):
    with pytest.raises(ValueError, match=message):
        datamodule(data_config(two_tasks, **kw))


def test_a_union_classifier_refuses_two_tasks_sharing_a_class_name_and_names_both(two_tasks):
    same = [{"dataset": "imagefolder", "root": str(two_tasks[0]), "name": "again"}]
    with pytest.raises(ValueError, match=r"tasks 'imagefolder' and 'again' both have a class named 'blue'.*per_task"):
        datamodule(data_config(two_tasks, tasks=same))
    dm = datamodule(data_config(two_tasks, tasks=same, multi_task={"classifier": "per_task"}))
    assert dm.train_classnames == FIRST + FIRST


def test_a_multi_task_run_reports_each_task_and_exports_an_adapter_usable_on_one(two_tasks, tmp_path):
    first, second = two_tasks
    over = tiny_overrides(first, tmp_path, "coop", **{"data.setting": "multi_task", "data.shots": 2,
                                                       "data.tasks": f"[{{dataset: imagefolder, root: {second}, name: second}}]",
                                                       "method.n_ctx": 2, "baseline": "true"})
    results = run_fit(load_recipe(RECIPES / "coop" / "fewshot.yaml", over))
    metrics = results["metrics"]
    assert metrics["test_acc"] == pytest.approx((metrics["imagefolder_acc"] + metrics["second_acc"]) / 2)
    assert results["classes"] == {"imagefolder": 3, "second": 3}
    # the zero-shot baseline of one task is that task's own zero-shot accuracy
    alone = run_fit(load_recipe(RECIPES / "coop" / "fewshot.yaml", tiny_overrides(
        second, tmp_path / "alone", "zeroshot", **{"data.shots": 2})))
    assert results["zeroshot_metrics"]["second_acc"] == pytest.approx(alone["metrics"]["test_acc"])
    adapter = Path(results["adapter_dir"])
    meta = json.loads((adapter / "adapter.json").read_text())
    assert meta["class_tasks"] == ["imagefolder"] * 3 + ["second"] * 3
    method = load_adapter(adapter, task="second").eval()
    assert method.classnames == SECOND and method.class_tasks == ["second"] * 3
    with pytest.raises(Exception, match="task 'third' is not one this adapter was trained on \\(imagefolder, second\\)"):
        load_adapter(adapter, task="third")
    from adapt.inference import load_adapter as load_for_inference
    from tests.conftest import make_backbone

    model = load_for_inference(adapter, task="second", device="cpu", backbone=make_backbone())
    assert model.classnames == SECOND and model.class_tasks == ["second"] * 3


def _coop_adapter(backbone, path: Path, seed: int, names=FIRST, **cfg) -> Path:
    from adapt.export import save_adapter
    from adapt.methods import build_method

    torch.manual_seed(seed)
    method = build_method("coop", {"n_ctx": 2, **cfg}, backbone, names, ["a photo of a {}."])
    return save_adapter(method, path)


def test_a_warm_start_is_the_mean_of_its_sources(tiny_backbone, tmp_path):
    from adapt.methods import build_method
    from adapt.methods.adapters import read_adapter_state
    from adapt.warm_start import averaged_state, source_adapters, warm_start

    dirs = [_coop_adapter(tiny_backbone, tmp_path / f"s{i}", i) for i in (1, 2, 3)]
    found = source_adapters([str(d.parent / d.name) for d in dirs], "coop")
    mean = torch.stack([read_adapter_state(d)["prompts.ctx"] for d in dirs]).mean(0)
    torch.testing.assert_close(averaged_state(found)["prompts.ctx"], mean)
    target = build_method("coop", {"n_ctx": 2}, tiny_backbone, SECOND, ["a photo of a {}."])
    warm_start(target, found)  # a shared context moves to other classes
    torch.testing.assert_close(target.prompts.ctx.detach(), mean)


def test_warm_start_refuses_what_it_cannot_start_from(tiny_backbone, tmp_path):
    from adapt.methods import build_method
    from adapt.warm_start import source_adapters, warm_start

    with pytest.raises(RecipeError, match="holds no trained adapter.*train the source first"):
        source_adapters([str(tmp_path / "missing")], "coop")
    coop = _coop_adapter(tiny_backbone, tmp_path / "coop", 1)
    with pytest.raises(RecipeError, match="is a coop run, but this recipe trains kgcoop"):
        source_adapters([str(coop)], "kgcoop")
    csc = _coop_adapter(tiny_backbone, tmp_path / "csc", 1, csc=True)
    target = build_method("coop", {"n_ctx": 2, "csc": True}, tiny_backbone, FIRST[:2], ["a photo of a {}."])
    with pytest.raises(RecipeError, match="does not fit this coop.*prompts.ctx"):
        warm_start(target, source_adapters([str(csc)], "coop"))


def test_mvlpt_transfer_a_multi_task_source_starts_a_single_task_target(two_tasks, tmp_path):
    """Stage 1: CoOp on both tasks at once; stage 2: the second task alone, from stage 1's
    context (at a learning rate too small to move it, the adapter is that context)."""
    from adapt.methods.adapters import read_adapter_state

    first, second = two_tasks
    source = run_fit(load_recipe(RECIPES / "coop" / "fewshot.yaml", tiny_overrides(
        first, tmp_path / "source", "coop", **{"data.setting": "multi_task", "data.shots": 2, "method.n_ctx": 2,
                                               "data.tasks": f"[{{dataset: imagefolder, root: {second}, name: second}}]"})))
    target = run_fit(load_recipe(RECIPES / "coop" / "fewshot.yaml", tiny_overrides(
        second, tmp_path / "target", "coop", **{"data.shots": 2, "method.n_ctx": 2, "optim.lr": 1e-12, "optim.warmup_lr": 1e-12,
                                                "warm_start": f"[{source['run_dir']}]"})))
    torch.testing.assert_close(read_adapter_state(Path(target["adapter_dir"]))["prompts.ctx"],
                               read_adapter_state(Path(source["adapter_dir"]))["prompts.ctx"], rtol=0, atol=1e-6)
    with pytest.raises(RecipeError, match="warm_start: .* holds no trained adapter"):
        run_fit(load_recipe(RECIPES / "coop" / "fewshot.yaml", tiny_overrides(
            second, tmp_path / "t2", "coop", **{"warm_start": f"[{tmp_path / 'nothing'}]"})))
