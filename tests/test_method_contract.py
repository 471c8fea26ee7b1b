"""Contract every registered method must honour (the loop picks up new methods automatically)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapt.config import load_recipe
from adapt.export import load_adapter, save_adapter
from adapt.methods import Method, build_method, get_method, list_methods
from adapt.run import run_fit
from adapt.tasks import get_task
from tests.conftest import CLASSES, required_build, required_data, tiny_overrides

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

NAMES = CLASSES[:4]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


def _task(name) -> str:
    """The task a method is checked on where only one is used: single-label where it does it."""
    tasks = get_method(name).tasks
    return "single_label" if "single_label" in tasks else tasks[0]


def _labels(task: str) -> torch.Tensor:
    """Four images' training targets of the task (multi-label with an unknown entry; label
    maps with an ignored band)."""
    if task == "single_label":
        return torch.tensor([0, 1, 2, 3])
    if task == "segmentation":
        maps = torch.arange(4)[:, None, None].repeat(1, 32, 32)
        maps[:, :, :4] = 255
        return maps
    return torch.tensor([[1, 0, 0, 1], [0, 1, -1, 0], [0, 0, 1, 0], [1, 1, 0, 1]])


# configs that keep a method's own setup stage seconds long here (SVL-Adapter's SimCLR
# pretraining: ResNet-50 for 200 epochs by default)
FAST_CONFIG = {"svladapter": {"ssl_arch": "resnet_small", "ssl_epochs": 1, "ssl_image_size": 32,
                              "ssl_feature_size": None, "ssl_batch_size": 64}}


def _build(name, backbone, datamodule):
    torch.manual_seed(0)
    need = required_build(name, CLASSES)  # with the data it requires (a class tree, class text)
    task = get_task(_task(name), **need["task_options"])
    method = build_method(name, FAST_CONFIG.get(name), backbone, NAMES, TEMPLATES, task=task,
                          class_text=need["class_text"])
    method.setup(datamodule)
    return method


# every (method, task kind it declares): each runs through the runner on data of that kind
METHOD_TASKS = [(m, t) for m in list_methods() for t in get_method(m).tasks]


@pytest.mark.parametrize("name", list_methods())
def test_logits_are_finite_and_shaped(name, tiny_backbone, tiny_datamodule):
    method = _build(name, tiny_backbone, tiny_datamodule).eval()
    images = torch.randn(3, 3, 32, 32)
    logits = method.predict(images)
    # [B, K] scores, or [B, K, h, w] maps for a task whose logits have a grid
    assert logits.shape[:2] == (3, len(NAMES)) and logits.dim() == 2 + get_task(_task(name)).logit_grid
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list_methods())
def test_only_method_parameters_train(name, tiny_backbone, tiny_datamodule):
    """Only what the method names trains; a method that changes the backbone does so on its own
    copy: the backbone it was given (shared with zero-shot, other runs) never changes."""
    shared_before = {k: v.clone() for k, v in tiny_backbone.state_dict().items()}
    method = _build(name, tiny_backbone, tiny_datamodule)
    trainable_backbone = {n for n, p in method.backbone.named_parameters() if p.requires_grad}
    assert trainable_backbone == set(method.backbone_state())
    assert not any(p.requires_grad for p in tiny_backbone.parameters())
    if method.changes_backbone:
        assert method.backbone is not tiny_backbone and trainable_backbone
        saved = {k for k in method.trainable_state() if k.startswith("backbone.")}
        assert saved <= {"backbone." + n for n in trainable_backbone}
    else:
        assert method.backbone is tiny_backbone and not trainable_backbone
    if not method.is_trainable:
        pytest.skip(f"{name} has no trainable parameters")
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    before = {k: v.clone() for k, v in method.state_dict().items()}
    method.train()
    images, labels = torch.randn(4, 3, 32, 32), _labels(_task(name))
    opt = torch.optim.SGD(method.trainable_parameters(), lr=1.0)
    method.loss(method.output(images), labels).backward()
    opt.step()
    after = method.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "one optimizer step changed nothing"
    # the method's own running statistics (DenseCLIP's BatchNorms) are its state, saved with it;
    # nothing of the backbone's may change but what it names
    own_buffers = {n for n, _ in method.named_buffers() if not n.startswith("backbone.")}
    assert changed <= trainable | own_buffers, f"frozen state changed: {sorted(changed - trainable - own_buffers)}"
    shared_after = tiny_backbone.state_dict()
    assert set(shared_after) == set(shared_before)  # nothing injected into the shared model
    assert all(torch.equal(shared_before[k], shared_after[k]) for k in shared_before)


@pytest.mark.parametrize("name", list_methods())
def test_the_gradient_transform_is_the_identity_unless_the_method_defines_one(name, tiny_backbone,
                                                                              tiny_datamodule):
    """The engine hands every step's gradient to ``transform_gradients``: a method that does not
    define one gets its backward gradient back untouched; one that does acts once per step (on
    what its losses since the last step left), and a second call with nothing new is a no-op."""
    method = _build(name, tiny_backbone, tiny_datamodule)
    if not method.is_trainable:
        pytest.skip(f"{name} has no trainable parameters")
    method.train()
    images, labels = torch.randn(4, 3, 32, 32), _labels(_task(name))
    method.loss(method.output(images), labels).backward()
    params = [p for p in method.trainable_parameters() if p.grad is not None]
    backward = [p.grad.clone() for p in params]
    reduced = []
    method.transform_gradients(lambda t: reduced.append(t) or t)
    once = [p.grad.clone() for p in params]
    if type(method).transform_gradients is Method.transform_gradients:
        assert all(torch.equal(a, b) for a, b in zip(once, backward)) and not reduced
    method.transform_gradients(lambda t: t)
    assert all(torch.equal(a, p.grad) for a, p in zip(once, params))


@pytest.mark.parametrize("name", list_methods())
def test_parameter_groups_partition_what_trains_and_at_multiplier_one_equal_one_group(name, tiny_backbone,
                                                                                      tiny_datamodule):
    """``param_groups`` names every trainable tensor exactly once; the engine's optimizer over
    those groups with every multiplier set to 1 steps exactly as one group at the recipe's lr."""
    from omegaconf import OmegaConf

    from adapt.engine_optim import optimizer_groups

    method = _build(name, tiny_backbone, tiny_datamodule)
    if not method.is_trainable:
        pytest.skip(f"{name} has no trainable parameters")
    groups = method.param_groups()
    grouped = [id(p) for g in groups.values() for p in g.params]
    assert sorted(grouped) == sorted(id(p) for p in method.trainable_parameters())
    method.train()
    method.loss(method.output(torch.randn(4, 3, 32, 32)), _labels(_task(name))).backward()
    grads = {id(p): p.grad.clone() for p in method.trainable_parameters() if p.grad is not None}
    start = {k: v.clone() for k, v in method.trainable_state().items()}
    cfg = OmegaConf.create({"lr": 0.5, "weight_decay": 0.01,
                            "groups": {g: {"lr_scale": 1.0, "weight_decay_scale": 1.0} for g in groups}})
    ends = []
    for params in (optimizer_groups(method, cfg), method.trainable_parameters()):
        method.load_trainable_state(start)
        for p in method.trainable_parameters():
            p.grad = grads[id(p)].clone() if id(p) in grads else None
        torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=0.01).step()
        ends.append({k: v.clone() for k, v in method.trainable_state().items()})
    assert all(torch.equal(ends[0][k], ends[1][k]) for k in start)
    assert any(not torch.equal(ends[0][k], start[k]) for k in start)


@pytest.mark.parametrize("name", list_methods())
def test_export_then_load_gives_identical_logits(name, tiny_backbone, tiny_datamodule, tmp_path):
    method = _build(name, tiny_backbone, tiny_datamodule)
    with torch.no_grad():  # move the trainable state away from its initialisation
        for p in method.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_adapter(method, tmp_path)
    loaded = load_adapter(tmp_path, backbone=tiny_backbone)
    images = torch.randn(3, 3, 32, 32)
    method.eval(), loaded.eval()
    assert torch.allclose(method.predict(images), loaded.predict(images), atol=1e-6)


@pytest.mark.parametrize("name", list_methods())
def test_feature_path_equals_image_path(name, tiny_backbone, tiny_datamodule):
    """A method that declares it can run on cached features gives the same logits from the
    frozen encoder's features (as the data module serves them) as from the images."""
    method = _build(name, tiny_backbone, tiny_datamodule).eval()
    if not method.supports_feature_cache:
        pytest.skip(f"{name} needs images")
    dm = tiny_datamodule
    items = dm.eval_sets["test"][1][:5]
    images = torch.stack([dm.dataloader(items, dm.test_transform(), 5).dataset[i][0] for i in range(5)])
    served = dm.encode(tiny_backbone, items, dm.test_transform(), "contract", normalize=False,
                       dense=method.dense_inputs)
    with torch.no_grad():
        method.reset_test_state()  # an online method's memory starts afresh for each stream
        from_images = method.predict(images)
        method.reset_test_state()
        from_features = method.predict(served.features[0])
    assert (from_images - from_features).abs().max() <= 1e-5


@pytest.mark.parametrize("name", list_methods())
def test_repointing_keeps_each_class_or_refuses(name, tiny_backbone, tiny_datamodule):
    """Re-pointed at other class names, a text-side method classifies each known class as
    before (its column is rebuilt from the same name: the zero-shot-consistent behaviour); a
    class-specific one refuses with a message saying so."""
    method = _build(name, tiny_backbone, tiny_datamodule).eval()
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    images = torch.randn(3, 3, 32, 32)
    other = [NAMES[2], CLASSES[5], NAMES[0], CLASSES[4]]  # two known (reordered), two new
    if not method.repointable:
        with pytest.raises(ValueError, match="cannot classify other class names"):
            method.set_classnames(other)
        return
    def predict():  # a test-time method starts every evaluation with no adaptation state
        method.reset_test_state()
        return method.predict(images)

    with torch.no_grad():
        before = predict()
        method.set_classnames(other)
        after = predict()
    assert after.shape[:2] == (3, len(other)) and torch.isfinite(after).all()
    # test-time adaptation (TPT's tuning, Zero's vote, TDA's and DMN's memories) depends on the
    # whole class list; every other method keeps each known class's column
    if not (method.test_time or method.couples_classes):
        assert (after[:, 0] - before[:, 2]).abs().max() <= 1e-4
        assert (after[:, 2] - before[:, 0]).abs().max() <= 1e-4
    if method.couples_classes:  # the same classes reordered: the same columns, reordered
        order = [2, 0, 3, 1]
        with torch.no_grad():
            method.set_classnames([NAMES[i] for i in order])
            # relative: a coupled computation (PLOT's Sinkhorn) carries the text tower's round-off
            # of another class order through its iterations, at the random tower's logit scale
            assert torch.allclose(predict(), before[:, order], rtol=1e-5, atol=1e-4)
    method.set_classnames(NAMES)
    with torch.no_grad():
        assert (predict() - before).abs().max() <= 1e-5


@pytest.mark.parametrize("name,task", METHOD_TASKS)
def test_method_scalars_reach_results_json(name, task, image_folder, multilabel_folder, segmentation_folder,
                                          tmp_path):
    """Every method runs from a recipe through the runner on data of each task kind it
    declares, the task's metrics name the result, and its scalars land in results.json."""
    data = {"single_label": {},
            "multi_label": {"data.dataset": "multilabel_csv", "data.root": str(multilabel_folder), "data.shots": 0},
            "segmentation": {"data.dataset": "segmentation_csv", "data.root": str(segmentation_folder),
                             "data.shots": 0}}[task]
    need = {f"data.{k}": v for k, v in required_data(name).items()}
    over = tiny_overrides(image_folder, tmp_path, name, **{
        "trainer.max_epochs": 1, "run_name": "r", "method.name": name, **data, **need})
    if name == "tpt":
        over += ["method.n_views=4"]
    if name == "linearprobe":
        over += ["method.search_steps=0"]
    over += [f"method.{k}={'null' if v is None else v}" for k, v in FAST_CONFIG.get(name, {}).items()]
    recipe = RECIPES / name / "fewshot.yaml"
    if name == "subpt":  # its few-shot recipe is stage 2, which starts from a stage-1 run
        recipe = RECIPES / name / "trajectory.yaml"
    results = run_fit(load_recipe(recipe if recipe.is_file() else RECIPES / "coop/fewshot.yaml", over))
    saved = json.loads((tmp_path / "r" / "results.json").read_text())
    assert saved["scalars"] == results["scalars"]
    from adapt.tasks import get_task

    primary = get_task(task).primary
    assert saved["task"] == task and 0 <= saved["metrics"][f"test_{primary}"] <= 100
    reports = get_method(name).scalars is not Method.scalars  # the fitted method's own values
    if reports or name in TRAINING_SCALARS:
        assert saved["scalars"], f"{name} reports scalars but results.json has none"
    for key in TRAINING_SCALARS.get(name, ()):
        assert key in saved["scalars"], (name, sorted(saved["scalars"]))


# the loss terms a method's training reports (the rest report Method.scalars after fitting)
TRAINING_SCALARS = {"kgcoop": ("ce", "kg"), "prograd": ("ce", "kl"), "lasp": ("ce", "t2t"), "bpl": ("nll", "kl"),
                    "proda": ("ce", "diversity"), "cpl": ("ce", "cf", "unorm"), "protect": ("dtl", "nce"),
                    "protect_maple": ("dtl", "nce"), "promptsrc": ("ce", "text_l1", "image_l1", "logits_kl"),
                    "sgva": ("vision", "kd", "cross"), "must": ("st", "fair", "mim", "align", "conf_ratio"),
                    "must_lora": ("st", "fair", "mim", "align", "conf_ratio"),
                    "cavpt": ("ce", "zs_image_ce", "zs_text_ce", "layer_ce"),
                    "denseclip": ("decode", "aux_identity"), "denseclip_ft": ("decode", "aux_identity")}


@pytest.mark.parametrize("name", list_methods())
def test_methods_declare_the_tasks_they_do_and_refuse_the_rest(name, tiny_backbone):
    """Every method names known task kinds; built for each it gets that task (its default loss
    is the task's), and data of any other kind is refused naming the methods that can do it."""
    from adapt.tasks import get_task, list_tasks

    cls = get_method(name)
    assert cls.tasks and set(cls.tasks) <= set(list_tasks()), cls.tasks
    for task in list_tasks():
        if task in cls.tasks:
            method = build_method(name, None, tiny_backbone, NAMES, TEMPLATES, task=task)
            assert method.task.name == task and isinstance(method.task, type(get_task(task)))
        else:
            with pytest.raises(ValueError, match=f"method '{name}' does .* but this data is {task}"):
                build_method(name, None, tiny_backbone, NAMES, TEMPLATES, task=task)


@pytest.mark.parametrize("name", list_methods())
def test_a_per_task_classifier_leaves_the_loss_and_its_gradient_finite(name, tiny_backbone, tiny_datamodule):
    """data.multi_task.classifier=per_task sets every class outside an image's task to -inf
    before the method's loss (``own_task_logits``): whatever else the loss reads, it and its
    gradient stay finite."""
    from adapt.tasks.single_label import own_task_logits, task_ids

    if "single_label" not in get_method(name).tasks:
        pytest.skip(f"{name} does not do single-label data")
    if not get_method(name).per_task_loss:  # it says so: the setting refuses it
        from adapt.data import DataConfig
        from adapt.settings import get_setting

        cfg = DataConfig(setting="multi_task", tasks=["x"], multi_task={"classifier": "per_task"})
        with pytest.raises(ValueError, match=f"{name}'s loss .* use classifier=union"):
            get_setting("multi_task").check_method(cfg, get_method(name))
        return
    method = _build(name, tiny_backbone, tiny_datamodule)
    if not method.is_trainable:
        pytest.skip(f"{name} has no trainable parameters")
    method.train()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    out = method.output(images)
    out.logits = own_task_logits(out.logits, labels, task_ids(["a", "a", "b", "b"]))
    loss = method.loss(out, labels)
    assert torch.isfinite(loss).all()
    loss.backward()
    grads = [p.grad for p in method.trainable_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
