"""adapt's CoOp and CoCoOp against the original trainers, imported from a checkout of
KaiyangZhou/CoOp that ``ADAPT_COOP_REPO`` names (skipped without one; nothing of it is committed).

The same weights (fp16 numbers, shared with the original's ``clip.build_model``), the same
prompt values: the logits agree to fp32 round-off, and one original ``forward_backward`` (SGD as
CoOp's configs) moves the context as one adapt step does. This is also what
``experiments/bench_speed.py --reference-repo`` relies on when it times the original.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from adapt.methods import build_method
from tests.conftest import make_backbone

REPO = os.environ.get("ADAPT_COOP_REPO")
pytestmark = pytest.mark.skipif(not REPO, reason="set ADAPT_COOP_REPO to a checkout of KaiyangZhou/CoOp")
NAMES = ["tench", "goldfish", "great white shark", "tiger shark"]


@pytest.mark.parametrize("kind", ["coop", "cocoop"])
def test_logits_and_one_step_match_the_original(kind, capsys):
    from experiments.original_coop import SGD, OriginalCoOp, copy_prompt_state, round_to_fp16

    bb = make_backbone("test-vit-openai-77")
    round_to_fp16(bb)
    trainer = getattr(OriginalCoOp(REPO, bb), kind)(NAMES)
    method = build_method(kind, None, bb, NAMES, ["a photo of a {}."]).train()
    with torch.no_grad():  # different starting values than either's initialisation
        method.prompts.ctx.normal_(0, 0.1)
    copy_prompt_state(trainer, method)
    assert "Initial context" in capsys.readouterr().out  # the original's own constructor ran
    torch.manual_seed(1)
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 1])
    trainer.model.eval()
    with torch.no_grad():
        theirs, ours = trainer.model(images), method(images)
    assert (theirs - ours).abs().max() <= 2e-5 * theirs.abs().max()
    assert (theirs.argsort(-1) == ours.argsort(-1)).all()
    trainer.model.train()
    before = method.prompts.ctx.detach().clone()
    trainer.forward_backward({"img": images, "label": labels})
    opt = torch.optim.SGD(method.trainable_parameters(), **SGD)
    F.cross_entropy(method(images), labels).backward()
    opt.step()
    moved = trainer.model.prompt_learner.ctx.detach()
    step = (moved - before).abs().max()
    assert step > 1e-5 and (moved - method.prompts.ctx.detach()).abs().max() <= 1e-3 * step
    if kind == "cocoop":
        theirs_w = trainer.model.prompt_learner.meta_net.linear1.weight.detach()
        assert (theirs_w - method.trainable_state()["meta_net.0.weight"]).abs().max() <= 1e-7
