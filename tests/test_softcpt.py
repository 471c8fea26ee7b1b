"""SoftCPT: a task's class context is generated from the task's name."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from adapt.methods import build_method
from adapt.tasks.single_label import own_task_logits, task_ids
from tests.conftest import make_backbone

NAMES = ["red", "green", "blue", "striped", "dotted"]
TASKS = ["colour"] * 3 + ["fill"] * 2


def _softcpt(backbone, names=NAMES, tasks=TASKS, **cfg):
    torch.manual_seed(0)
    return build_method("softcpt", cfg or None, backbone, names, ["a photo of a {}."], class_tasks=tasks)


def test_the_context_is_the_task_feature_through_the_generator(tiny_backbone):
    method = _softcpt(tiny_backbone)
    g = method.task_features()
    assert g.shape[0] == 2 and not torch.allclose(g.norm(dim=-1), torch.ones(2))  # not normalised
    ctx = method.contexts()
    torch.testing.assert_close(ctx[1], (g[1] @ method.generator).view(16, -1))
    # the classes' features: their own prompts around their task's context, every class's full
    # prompt through the text tower (the method runs each task's shared prefix once)
    from adapt.methods.prompts import ContextPrompts

    full = ContextPrompts(tiny_backbone, 16, learned=False)
    full.build(NAMES)
    expected = full.text_features(ctx[method.class_task])
    torch.testing.assert_close(method.text_features(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ctx[0], ctx[1])  # the task names differ, so do their contexts


def test_interleaved_tasks_keep_every_class_in_its_place(tiny_backbone):
    mixed = ["colour", "fill", "colour", "fill", "colour"]
    method = _softcpt(tiny_backbone, tasks=mixed).eval()
    x = torch.randn(2, 3, 32, 32)
    for name, task in zip(NAMES, mixed):  # each column is the class pointed at alone
        alone = _softcpt(tiny_backbone, names=[name], tasks=[task]).eval()
        torch.testing.assert_close(method(x)[:, NAMES.index(name)], alone(x)[:, 0], rtol=1e-5, atol=1e-5)


def test_a_class_scores_the_same_in_the_union_and_pointed_at_its_task_alone(tiny_backbone):
    method = _softcpt(tiny_backbone).eval()
    x = torch.randn(3, 3, 32, 32)
    union = method(x)
    method.set_classnames(NAMES[3:], TASKS[3:])
    torch.testing.assert_close(method(x), union[:, 3:])
    # the same class names under another task name are another classifier
    method.set_classnames(NAMES[3:], ["colour"] * 2)
    assert not torch.allclose(method(x), union[:, 3:])


def test_only_the_task_context_and_the_generator_train(tiny_backbone):
    method = _softcpt(tiny_backbone)
    assert sorted(method.trainable_state()) == ["generator", "task_prompts.ctx"]
    d, width = tiny_backbone.embed_dim, tiny_backbone.text_width
    assert method.generator.shape == (d, 16 * width) and method.task_prompts.ctx.shape == (4, width)


REPO = os.environ.get("ADAPT_SOFTCPT_REPO")


@pytest.mark.skipif(not REPO, reason="set ADAPT_SOFTCPT_REPO to a checkout of kding1225/softcpt")
def test_logits_loss_and_gradients_match_the_original():
    from experiments.original_coop import round_to_fp16
    from experiments.original_softcpt import OriginalSoftCPT

    backbone = make_backbone("test-vit-openai-77-e64")  # the original's 77 tokens; d (64) != D
    round_to_fp16(backbone)  # the original's build_model stores the weights in fp16
    ours = _softcpt(backbone)
    ref = OriginalSoftCPT(REPO, backbone)
    model = ref.model(["colour", "fill"], [NAMES[:3], NAMES[3:]])
    with torch.no_grad():
        model.task_prompt_learner.ctx.copy_(ours.task_prompts.ctx)
        model.prompt_gen.proj.copy_(ours.generator)
    torch.manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 2, 3, 4])
    logits, _ = model(x)
    torch.testing.assert_close(ours(x), logits, rtol=1e-5, atol=1e-5)
    multi_hot = torch.full((4, 5), -1)  # the original's labels: one-hot in the task, -1 elsewhere
    for i, label in enumerate(y.tolist()):
        lo, hi = (0, 3) if label < 3 else (3, 5)
        multi_hot[i, lo:hi] = 0
        multi_hot[i, label] = 1
    ref_loss, _ = ref.loss(logits, multi_hot)
    ref_loss.backward()
    # adapt: the engine's per_task classifier, then the method's (the task's) cross-entropy
    loss = ours.loss(own_task_logits(ours(x), y, task_ids(TASKS)), y)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    # fp32 round-off of two text-tower passes, relative to each gradient's scale
    for mine, theirs in ((ours.generator.grad, model.prompt_gen.proj.grad),
                         (ours.task_prompts.ctx.grad, model.task_prompt_learner.ctx.grad)):
        assert theirs.abs().max() > 0
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-4 * float(theirs.abs().max()))
