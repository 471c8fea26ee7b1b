"""Engine hooks beyond the loss: the gradient transform runs once per optimizer step, on the
gradient that step uses (accumulated over micro-batches), before the optimizer reads it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from adapt.config import OptimConfig
from adapt.engine import AdaptModule
from adapt.methods import HandWrittenClassifier, register_method, unregister_method
from tests.conftest import CLASSES

NAMES = CLASSES[:4]


@dataclass
class _Config:
    zero: bool = False  # the transform zeroes the gradient


class _ScaleBias(HandWrittenClassifier):
    """Zero-shot logits times a learned scale plus a learned per-class bias: the toy methods'
    trainable part."""

    Config = _Config
    supports_feature_cache = True

    def __init__(self, config, backbone, classnames, templates):
        super().__init__(config, backbone, classnames, templates)
        self.scale = torch.nn.Parameter(torch.tensor(10.0))
        self.bias = torch.nn.Parameter(torch.zeros(len(self.classnames)))
        self.rebuild_classes()

    def forward_features(self, f):
        return self.scale * (f @ self.text_features.t()) + self.bias


@pytest.fixture
def recording_method():
    @register_method("toy_gradient_hook")
    class Recording(_ScaleBias):
        def __init__(self, config, backbone, classnames, templates):
            super().__init__(config, backbone, classnames, templates)
            self.seen: list[torch.Tensor] = []

        def transform_gradients(self, reduce):
            self.seen.append(reduce(self.bias.grad.clone()))
            if self.config.zero:
                for p in self.trainable_parameters():
                    p.grad.zero_()

    yield Recording
    unregister_method("toy_gradient_hook")


def _fit(backbone, feats, labels, accumulate: int, **config):
    optim = {**dataclasses.asdict(OptimConfig()), "lr": 0.1, "warmup_epochs": 0, "weight_decay": 0.0}
    module = AdaptModule("toy_gradient_hook", config, NAMES, ["a photo of a {}."], {"name": "adapt-tiny-vit"},
                         optim, 1, prebuilt_backbone=backbone)
    start = {k: v.clone() for k, v in module.method.trainable_state().items()}
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, max_epochs=1, accumulate_grad_batches=accumulate)
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(feats, labels), batch_size=4))
    return module.method, start


def test_the_transform_sees_the_accumulated_gradient_once_per_step(tiny_backbone, recording_method):
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(16, tiny_backbone.embed_dim, generator=g), torch.randint(0, 4, (16,), generator=g)
    method, start = _fit(tiny_backbone, feats, labels, accumulate=2)
    assert len(method.seen) == 2  # 4 micro-batches, 2 optimizer steps
    # the first step's gradient: the mean of the first two micro-batches' gradients, at the start values
    method.load_trainable_state(start)
    method.train()
    by_hand = []
    for lo in (0, 4):
        method.bias.grad = None
        method.loss(method.output(feats[lo:lo + 4]), labels[lo:lo + 4]).backward()
        by_hand.append(method.bias.grad.clone())
    assert torch.allclose(method.seen[0], (by_hand[0] + by_hand[1]) / 2, atol=1e-6)
    assert not torch.allclose(method.seen[0], by_hand[1] / 2, atol=1e-6)


def test_the_optimizer_steps_with_the_transformed_gradient(tiny_backbone, recording_method):
    g = torch.Generator().manual_seed(1)
    feats, labels = torch.randn(12, tiny_backbone.embed_dim, generator=g), torch.randint(0, 4, (12,), generator=g)
    zeroed, start = _fit(tiny_backbone, feats, labels, accumulate=1, zero=True)
    assert len(zeroed.seen) == 3 and zeroed.seen[0].abs().max() > 0
    # momentum SGD without weight decay on zero gradients: nothing moves
    assert all(torch.equal(v, start[k]) for k, v in zeroed.trainable_state().items())
    plain, start = _fit(tiny_backbone, feats, labels, accumulate=1)
    assert not torch.equal(plain.trainable_state()["bias"], start["bias"])


# ------------------------------------------------------------------ per-epoch lr and epoch start --
@pytest.fixture
def staged_method():
    """Two groups that take turns by epoch (CLIPPR's stages): ``scale`` trains in even epochs at
    the recipe's lr, ``bias`` in odd ones at half of it."""

    @register_method("toy_staged")
    class Staged(_ScaleBias):
        def __init__(self, config, backbone, classnames, templates):
            super().__init__(config, backbone, classnames, templates)
            self.started: list[int] = []

        def param_groups(self):
            from adapt.methods.base import ParamGroup

            return {"scale": ParamGroup([self.scale]), "bias": ParamGroup([self.bias])}

        def lr_factor(self, group, epoch):
            return (1.0 if epoch % 2 == 0 else 0.0) if group == "scale" else (0.5 if epoch % 2 else 0.0)

        def on_train_epoch_start(self, epoch, max_epochs):
            self.started.append(epoch)

    yield Staged
    unregister_method("toy_staged")


@pytest.mark.parametrize("interval", ["epoch", "step"])
def test_a_method_lr_factor_sets_each_groups_lr_per_epoch(tiny_backbone, staged_method, interval):
    """The method's per-group, per-epoch factor multiplies the recipe's schedule (constant here):
    a group at 0 keeps its values through its epochs, the other moves at its own lr; the
    epoch-start hook sees every epoch."""
    g = torch.Generator().manual_seed(2)
    feats, labels = torch.randn(8, tiny_backbone.embed_dim, generator=g), torch.randint(0, 4, (8,), generator=g)
    optim = {**dataclasses.asdict(OptimConfig()), "name": "sgd", "lr": 0.1, "momentum": 0.0,
             "warmup_epochs": 0, "weight_decay": 0.0, "scheduler": "constant", "interval": interval}
    module = AdaptModule("toy_staged", None, NAMES, ["a photo of a {}."], {"name": "adapt-tiny-vit"},
                         optim, 3, prebuilt_backbone=tiny_backbone)
    seen = []

    class Record(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            m = pl_module.method
            lrs = {grp["name"]: grp["lr"] for grp in trainer.optimizers[0].param_groups}
            seen.append((float(m.scale.detach()), m.bias.detach().clone(), lrs))

    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, max_epochs=3, callbacks=[Record()])
    start_scale = float(module.method.scale.detach())
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(feats, labels), batch_size=4))
    assert module.method.started == [0, 1, 2]
    (s0, b0, _), (s1, b1, _), (s2, b2, _) = seen
    assert s0 != start_scale and torch.equal(b0, torch.zeros(4))  # epoch 0: scale only
    assert s1 == s0 and not torch.equal(b1, b0)  # epoch 1: bias only
    assert s2 != s1 and torch.equal(b2, b1)  # epoch 2: scale again
    if interval == "epoch":  # by an epoch's end the schedule has set the next epoch's lr
        assert seen[0][2] == {"scale": 0.0, "bias": pytest.approx(0.05)}
        assert seen[1][2] == {"scale": pytest.approx(0.1), "bias": 0.0}


# ------------------------------------------------------------------ after every optimizer step --
@pytest.fixture
def stepping_method():
    @register_method("toy_step_hook")
    class Stepping(_ScaleBias):
        def __init__(self, config, backbone, classnames, templates):
            super().__init__(config, backbone, classnames, templates)
            self.steps: list[tuple[int, float]] = []

        def on_optimizer_step(self, step):
            self.steps.append((step, float(self.scale.detach())))  # the value this step produced

    yield Stepping
    unregister_method("toy_step_hook")


def test_the_step_hook_runs_after_every_optimizer_step_with_the_run_count(tiny_backbone, stepping_method, tmp_path):
    """``on_optimizer_step`` sees each step once, after it (accumulated micro-batches are one step),
    numbered over the run; a run resumed from a checkpoint continues the count."""
    g = torch.Generator().manual_seed(3)
    feats, labels = torch.randn(16, tiny_backbone.embed_dim, generator=g), torch.randint(0, 4, (16,), generator=g)
    optim = {**dataclasses.asdict(OptimConfig()), "lr": 0.1, "warmup_epochs": 0, "weight_decay": 0.0}

    def fit(epochs, ckpt=None):
        module = AdaptModule("toy_step_hook", None, NAMES, ["a photo of a {}."], {"name": "adapt-tiny-vit"},
                             optim, epochs, prebuilt_backbone=tiny_backbone)
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, max_epochs=epochs, accumulate_grad_batches=2,
                             default_root_dir=tmp_path)
        trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(feats, labels), batch_size=4), ckpt_path=ckpt)
        return module, trainer

    module, trainer = fit(1)
    assert [s for s, _ in module.method.steps] == [0, 1]  # 4 micro-batches, 2 steps
    # after the step: the hook sees the updated value, which differs from the start
    assert module.method.steps[0][1] != 10.0
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    resumed, _ = fit(2, ckpt=str(tmp_path / "one.ckpt"))
    assert [s for s, _ in resumed.method.steps] == [2, 3]
