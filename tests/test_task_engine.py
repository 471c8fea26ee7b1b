"""The engine follows the task kind: its default loss, its metrics, and the refusal of a method
that cannot do the data's task. A multi-label method defined here stands in until the
multi-label methods land."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from adapt.config import OptimConfig
from adapt.engine import AdaptModule
from adapt.methods import HandWrittenClassifier, build_method, register_method, unregister_method
from adapt.tasks.losses import asymmetric_loss
from adapt.tasks.metrics import mean_average_precision, threshold_scores
from tests.conftest import CLASSES

NAMES = CLASSES[:4]


@dataclass
class _Config:
    pass


@pytest.fixture
def multilabel_method():
    @register_method("toy_multilabel")
    class ToyMultiLabel(HandWrittenClassifier):
        Config = _Config
        supports_feature_cache = True
        tasks = ("single_label", "multi_label")

        def __init__(self, config, backbone, classnames, templates):
            super().__init__(config, backbone, classnames, templates)
            self.scale = torch.nn.Parameter(torch.tensor(10.0))
            self.rebuild_classes()

        def forward_features(self, f):
            return self.scale * (f @ self.text_features.t()) - 1

    yield ToyMultiLabel
    unregister_method("toy_multilabel")


def test_a_method_that_cannot_do_the_task_is_refused_naming_those_that_can(tiny_backbone, multilabel_method):
    with pytest.raises(ValueError, match=r"method 'coop' does single_label but this data is multi_label "
                                         r"\(a multi-hot vector .*\); methods for multi_label: dualcoop, taidpt, toy_multilabel, zeroshot$"):
        build_method("coop", None, tiny_backbone, NAMES, ["a photo of a {}."], task="multi_label")
    with pytest.raises(KeyError, match="unknown task 'multilabel'"):
        build_method("coop", None, tiny_backbone, NAMES, ["a photo of a {}."], task="multilabel")


def test_engine_trains_and_evaluates_with_the_tasks_loss_and_metrics(tiny_backbone, multilabel_method):
    optim = {**dataclasses.asdict(OptimConfig()), "lr": 0.01, "warmup_epochs": 0}
    module = AdaptModule("toy_multilabel", None, NAMES, ["a photo of a {}."], {"name": "adapt-tiny-vit"},
                         optim, 1, prebuilt_backbone=tiny_backbone, task="multi_label")
    assert module.method.task.name == "multi_label"
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(40, tiny_backbone.embed_dim, generator=g)
    targets = (torch.rand(40, 4, generator=g) < 0.4).long()
    targets[torch.rand(40, 4, generator=g) < 0.1] = -1
    with torch.no_grad():
        logits = module.method(feats)
    # the default loss is the task's (asymmetric, unknown entries dropped)
    assert float(module.method.loss(logits, targets)) == pytest.approx(float(asymmetric_loss(logits, targets)))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    loader = DataLoader(TensorDataset(feats, targets), batch_size=16)
    fit = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, max_epochs=1)
    fit.fit(module, train_dataloaders=loader)
    assert float(module.method.scale) != 10.0 and "train/map" in fit.callback_metrics
    with torch.no_grad():
        logits = module.method(feats)
    out = trainer.test(module, loader, verbose=False)
    probs = torch.sigmoid(logits)
    assert 100 * module.eval_results["map"] == pytest.approx(mean_average_precision(probs, targets), abs=1e-4)
    assert 100 * module.eval_results["cf1"] == pytest.approx(threshold_scores(probs, targets)["cf1"], abs=1e-4)
    assert out[0]["test/map"] == pytest.approx(module.eval_results["map"])


def test_single_label_figures_are_todays_accuracy(tiny_backbone):
    module = AdaptModule("zeroshot", None, NAMES, ["a photo of a {}."], {"name": "adapt-tiny-vit"},
                         {"name": "sgd", "lr": 0.1}, 1, prebuilt_backbone=tiny_backbone)
    g = torch.Generator().manual_seed(1)
    feats, labels = torch.randn(30, tiny_backbone.embed_dim, generator=g), torch.randint(0, 4, (30,), generator=g)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    out = trainer.test(module, DataLoader(TensorDataset(feats, labels), batch_size=8), verbose=False)
    with torch.no_grad():
        acc = float((module.method(feats).argmax(1) == labels).float().mean())
    assert out[0]["test/acc"] == pytest.approx(acc) and module.eval_results == {"acc": pytest.approx(acc)}


def test_an_adapter_remembers_its_task(tiny_backbone, multilabel_method, tmp_path):
    import json

    from adapt.export import load_adapter, save_adapter

    method = build_method("toy_multilabel", None, tiny_backbone, NAMES, ["a photo of a {}."], task="multi_label")
    save_adapter(method, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter.json").read_text())["task"] == "multi_label"
    assert load_adapter(tmp_path / "a", backbone=tiny_backbone).task.name == "multi_label"
