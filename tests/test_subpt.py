"""SubPT: stage 1 is CoOp recording its early contexts; stage 2 keeps every update in their span.

Pinned: the recorded trajectory (through a real fit, resume-safe as method state); the PCA
directions (centred, orthonormal, the projector of an independent SVD); the projection (in-span
gradients unchanged, orthogonal ones removed); that with no weight decay a whole stage-2 run
moves its context only inside the subspace; where stage 2 starts (``restart``); the refusals;
an exported stage-2 adapter loads without its stage-1 run; and, with a checkout of
machengcheng2016/Subspace-Prompt-Learning in ``ADAPT_SUBPT_REPO``, the original's projection.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from adapt.config import load_recipe
from adapt.export import load_adapter
from adapt.methods import build_method
from adapt.methods.subpt import principal_directions
from adapt.run import run_fit
from tests.conftest import CLASSES, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
NAMES = CLASSES[:4]


def _fit(recipe: str, image_folder, out: Path, name: str, **extra) -> Path:
    cfg = load_recipe(ROOT / "recipes/subpt" / recipe, tiny_overrides(
        image_folder, out, "subpt", **{"run_name": name, "method.n_ctx": 4, "data.batch_size": 8,
                                       "trainer.max_epochs": 6, "optim.warmup_epochs": 0, "optim.lr": 0.05,
                                       "seed": 1, **extra}))
    run_fit(cfg)
    return out / name


@pytest.fixture(scope="module")
def trajectory_run(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("subpt")
    return _fit("trajectory.yaml", image_folder, out, "stage1", **{"method.trajectory_epochs": 5})


def test_stage_one_is_coop_recording_each_epochs_context(trajectory_run):
    from safetensors.torch import load_file

    state = load_file(str(trajectory_run / "adapter/adapter.safetensors"))
    assert int(state["recorded"]) == 5  # 6 epochs trained, the first 5 recorded
    record = state["trajectory"]
    assert record.shape == (5, 4 * 64) and (record[1:] - record[:-1]).abs().amax(1).min() > 0  # it moved each epoch
    ckpt = torch.load(trajectory_run / "checkpoints/last.ckpt", weights_only=True)
    assert torch.equal(ckpt["state_dict"]["method.trajectory"], record)  # checkpoints (and resume) keep it
    assert not torch.equal(record[-1], state["prompts.ctx"].flatten())  # the 6th epoch is not recorded


def test_principal_directions_are_pcas():
    g = torch.Generator().manual_seed(0)
    points = torch.randn(12, 40, generator=g) @ torch.randn(40, 40, generator=g)
    u = principal_directions(points, 5)
    assert torch.allclose(u @ u.t(), torch.eye(5), atol=1e-5)
    centred = (points - points.mean(0)).numpy().astype(np.float64)
    vt = np.linalg.svd(centred, full_matrices=False)[2][:5]
    assert np.allclose(u.t().numpy() @ u.numpy(), vt.T @ vt, atol=1e-5)  # the same projector, signs aside


def test_stage_two_projects_each_step_and_moves_only_inside_the_subspace(trajectory_run, image_folder, tmp_path):
    # two runs from the same start (same seed), 6 and 3 epochs, no weight decay: what separates
    # them is made of projected steps only
    ends = []
    for epochs in (6, 3):
        run = _fit("fewshot.yaml", image_folder, tmp_path, f"stage2-{epochs}", **{
            "method.init_from": str(trajectory_run), "method.rank": 3, "optim.weight_decay": 0.0,
            "trainer.max_epochs": epochs})
        ends.append(load_adapter(run / "adapter"))
    method = ends[0]
    u = method.basis
    assert torch.equal(u, ends[1].basis)
    moved = method.prompts.ctx.detach().flatten() - ends[1].prompts.ctx.detach().flatten()
    assert moved.norm() > 1e-3
    assert (moved - u.t() @ (u @ moved)).norm() <= 1e-5 * moved.norm()  # every step stayed in span(U)
    start = build_method("subpt", {"n_ctx": 4, "stage": "subspace", "rank": 3}, method.backbone, NAMES,
                         ["a photo of a {}."])
    # the hook itself: a gradient in the span is kept, one orthogonal to it is removed
    g = torch.Generator().manual_seed(0)
    inside = u.t() @ torch.randn(3, generator=g)
    other = torch.randn(u.shape[1], generator=g)
    other -= u.t() @ (u @ other)
    start.basis.copy_(u)
    for grad, expect in ((inside, inside), (inside + other, inside)):
        start.prompts.ctx.grad = grad.view_as(start.prompts.ctx).clone()
        start.transform_gradients(lambda t: t)
        assert torch.allclose(start.prompts.ctx.grad.flatten(), expect, atol=1e-6)


def test_restart_first_epoch_starts_from_the_recorded_context(trajectory_run, tiny_backbone):
    from safetensors.torch import load_file

    record = load_file(str(trajectory_run / "adapter/adapter.safetensors"))["trajectory"]
    cfg = {"n_ctx": 4, "stage": "subspace", "rank": 3, "init_from": str(trajectory_run)}
    first = build_method("subpt", {**cfg, "restart": "first_epoch"}, tiny_backbone, NAMES, ["a photo of a {}."])
    assert torch.equal(first.prompts.ctx.detach().flatten(), record[0])
    seed = build_method("subpt", cfg, tiny_backbone, NAMES, ["a photo of a {}."])
    assert not torch.equal(seed.prompts.ctx.detach().flatten(), record[0])
    assert torch.allclose(seed.basis, first.basis)


def test_bad_starts_are_refused(trajectory_run, tiny_backbone, tmp_path):
    with pytest.raises(ValueError, match="recorded 5 epochs, which span at most 4 directions"):
        build_method("subpt", {"n_ctx": 4, "stage": "subspace", "rank": 5, "init_from": str(trajectory_run)},
                     tiny_backbone, NAMES, ["a photo of a {}."])
    with pytest.raises(ValueError, match="its contexts have 256 values, this subpt's 512"):
        build_method("subpt", {"n_ctx": 8, "stage": "subspace", "rank": 2, "init_from": str(trajectory_run)},
                     tiny_backbone, NAMES, ["a photo of a {}."])
    lost = build_method("subpt", {"n_ctx": 4, "stage": "subspace"}, tiny_backbone, NAMES, ["a photo of a {}."])
    with pytest.raises(ValueError, match="none was given: set method.init_from="):
        lost.setup(None)  # before any training: zero directions would silently freeze the context
    with pytest.raises(ValueError, match="set method.stage=subspace"):
        build_method("subpt", {"init_from": str(trajectory_run)}, tiny_backbone, NAMES, ["a photo of a {}."])


def test_an_exported_stage_two_adapter_loads_without_its_stage_one_run(trajectory_run, image_folder, tmp_path,
                                                                        tiny_backbone):
    copy = tmp_path / "stage1"
    shutil.copytree(trajectory_run, copy)
    run = _fit("fewshot.yaml", image_folder, tmp_path, "stage2", **{"method.init_from": str(copy),
                                                                    "method.rank": 3})
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = load_adapter(run / "adapter", backbone=tiny_backbone).eval().predict(images)
    shutil.rmtree(copy)  # the starting point is gone; the adapter holds its basis and context
    method = load_adapter(run / "adapter", backbone=tiny_backbone).eval()
    with torch.no_grad():
        assert torch.equal(method.predict(images), before) and method.basis.abs().sum() > 0


REPO = os.environ.get("ADAPT_SUBPT_REPO")


@pytest.mark.skipif(not REPO, reason="set ADAPT_SUBPT_REPO to a checkout of machengcheng2016/Subspace-Prompt-Learning")
def test_the_projection_matches_the_originals(trajectory_run, tiny_backbone):
    """The original's ``model_subspace_backward_and_update`` on a stand-in trainer (its U from
    the same record), against one adapt step: the same gradient, the same SGD step."""
    import types

    from experiments.original_coop import SGD
    from experiments.original_prograd import dassl_trainer_base

    base = dassl_trainer_base(Path(REPO) / "Dassl.pytorch/dassl/engine/trainer.py")
    ours = build_method("subpt", {"n_ctx": 4, "stage": "subspace", "rank": 3, "init_from": str(trajectory_run)},
                        tiny_backbone, NAMES, ["a photo of a {}."]).train()
    theirs = build_method("coop", {"n_ctx": 4}, tiny_backbone, NAMES, ["a photo of a {}."]).train()
    with torch.no_grad():
        theirs.prompts.ctx.copy_(ours.prompts.ctx)
    trainer = types.SimpleNamespace(U=ours.basis.clone(), _models={"prompt_learner": theirs.prompts},
                                    _optims={"prompt_learner": torch.optim.SGD(theirs.prompts.parameters(), **SGD)})
    for name in ("get_model_names", "model_zero_grad", "model_backward", "detect_anomaly",
                 "model_subspace_backward_and_update"):
        setattr(trainer, name, types.MethodType(getattr(base, name), trainer))
    feats, labels = torch.randn(6, tiny_backbone.embed_dim), torch.tensor([0, 1, 2, 3, 0, 1])
    trainer.model_subspace_backward_and_update(theirs.loss(theirs.output(feats), labels))
    opt = torch.optim.SGD(ours.trainable_parameters(), **SGD)
    ours.loss(ours.output(feats), labels).backward()
    ours.transform_gradients(lambda t: t)
    opt.step()
    assert torch.allclose(theirs.prompts.ctx.grad, ours.prompts.ctx.grad, atol=1e-7)
    assert (theirs.prompts.ctx - ours.prompts.ctx).abs().max() <= 1e-7
