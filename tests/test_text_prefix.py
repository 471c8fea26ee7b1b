"""The shared-prefix text pass (``adapt/text_prefix.py``) equals the full sequences: features and
the gradients of everything learnable, for every method whose prompts share ``[SOS] ctx``, with
chunking and checkpointing, and it falls back where it cannot be exact. Exactness only."""
from __future__ import annotations

import pytest
import torch

import adapt.text_prefix as text_prefix
from adapt.methods import build_method
from tests.conftest import CLASSES, make_backbone

TEMPLATE = ["a photo of a {}."]
NAMES = CLASSES + ["a very long class name with many words", "x", "light sky blue"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _spy(monkeypatch) -> list:
    """Counts the prefix passes that really ran (the fallback runs none)."""
    calls, real = [], text_prefix._prefix_block

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(text_prefix, "_prefix_block", spy)
    return calls


def _full(prompts, ctx, per_image: bool = False):
    """Today's path: the assembled full sequences through ``encode_text_embeddings``."""
    bb = prompts.backbone[0]
    if not per_image:
        return bb.encode_text_embeddings(prompts.embeddings(ctx), prompts.tokens)
    emb = prompts.embeddings_per_image(ctx)
    b, c = emb.shape[:2]
    return bb.encode_text_embeddings(emb.flatten(0, 1), prompts.tokens.repeat(b, 1)).view(b, c, -1)


def _features_and_grad(fn, param: torch.Tensor, seed: int = 1):
    param.grad = None
    feats = fn()
    torch.manual_seed(seed)
    (feats * torch.randn_like(feats)).sum().backward()  # a loss that weighs every feature differently
    return feats.detach(), param.grad.clone()


@pytest.mark.parametrize("opts", [{}, {"text_chunk_size": 3}, {"text_chunk_size": 4, "grad_checkpointing": True}],
                         ids=["one-pass", "chunks", "chunks+checkpoints"])
def test_coop_context_equals_full_sequences(opts, monkeypatch):
    bb = make_backbone(**opts)
    method = build_method("coop", {"n_ctx": 4}, bb, NAMES, TEMPLATE)
    prompts = method.prompts
    with torch.no_grad():
        prompts.ctx.normal_(std=0.5)  # a context that matters
    calls = _spy(monkeypatch)
    shared, g_shared = _features_and_grad(prompts.text_features, prompts.ctx)
    assert len(calls) == bb.text_depth  # the prefix ran once per block: the shared path was taken
    full, g_full = _features_and_grad(lambda: _full(prompts, prompts.ctx), prompts.ctx)
    assert shared.shape == (len(NAMES), bb.embed_dim)
    assert _rel(shared, full) <= 1e-5 and _rel(g_shared, g_full) <= 1e-5


@pytest.mark.parametrize("opts", [{}, {"text_chunk_size": 5, "grad_checkpointing": True}])
def test_cocoop_per_image_context_equals_full_sequences(opts, monkeypatch):
    """Per-image contexts: one prefix per image (a group), every class's suffix against it; the
    meta-net's gradients too (they flow through the per-image prefix)."""
    bb = make_backbone(**opts)
    method = build_method("cocoop", {"n_ctx": 3, "ctx_init": ""}, bb, NAMES, TEMPLATE)
    feats = torch.nn.functional.normalize(torch.randn(4, bb.embed_dim), dim=-1)
    weight = method.meta_net[0].weight
    calls = _spy(monkeypatch)

    def shared():
        return method.prompts.text_features_per_image(method.image_context(feats))

    s, gs = _features_and_grad(shared, weight)
    assert len(calls) == bb.text_depth
    f, gf = _features_and_grad(lambda: _full(method.prompts, method.image_context(feats), per_image=True), weight)
    assert s.shape == (4, len(NAMES), bb.embed_dim)
    assert _rel(s, f) <= 1e-5 and _rel(gs, gf) <= 1e-5
    # and the images really differ: a per-group mix-up would not pass the check above by luck
    assert _rel(s[0], s[1]) > 1e-3


@pytest.mark.parametrize("name", ["kgcoop", "tpt", "ivlp", "maple"])
def test_other_prefix_sharing_methods_take_the_shared_path(name, monkeypatch):
    """KgCoOp and TPT build CoOp's prompts; IVLP and MaPLe add deep text prompts at the context
    slots, which lie inside the shared prefix: the same features as the full path."""
    bb = make_backbone()
    method = build_method(name, None, bb, NAMES, TEMPLATE)
    prompts = getattr(method, "prompts", None) or method.text.context
    calls = _spy(monkeypatch)
    with torch.no_grad():
        shared = method.text_features() if name in ("ivlp", "maple") else prompts.text_features()
    assert len(calls) == bb.text_depth
    deep = getattr(getattr(method, "text", None), "deep", None)
    with torch.no_grad():
        full = bb.encode_text_embeddings(prompts.embeddings(), prompts.tokens,
                                         None if deep is None else [None, *deep], 1)
    assert _rel(shared, full) <= 1e-5


def test_class_specific_and_middle_contexts_fall_back(monkeypatch):
    """Per-class contexts (equal at init, yet each class's own gradient) and a class name in the
    middle never take the shared path."""
    bb = make_backbone()
    calls = _spy(monkeypatch)
    csc = build_method("coop", {"csc": True, "ctx_init": "a photo of a"}, bb, NAMES, TEMPLATE)
    middle = build_method("coop", {"class_token_position": "middle"}, bb, NAMES, TEMPLATE)
    for m in (csc, middle):
        feats, grad = _features_and_grad(m.prompts.text_features, m.prompts.ctx)
        ref, ref_grad = _features_and_grad(lambda: _full(m.prompts, m.prompts.ctx), m.prompts.ctx)
        assert torch.equal(feats, ref) and torch.equal(grad, ref_grad)
    assert calls == []
    assert not torch.equal(csc.prompts.ctx.grad[0], csc.prompts.ctx.grad[1])


@pytest.mark.parametrize("case", ["slow-blocks", "peft-lora", "deep-prompt-past-prefix", "eot-in-prefix"])
def test_unshareable_cases_run_the_full_sequences(case, monkeypatch):
    bb = make_backbone(fast_blocks=case != "slow-blocks")
    method = build_method("coop", {"n_ctx": 4}, bb, NAMES, TEMPLATE)
    prompts = method.prompts
    deep, start = None, 1
    if case == "peft-lora":
        from adapt.split_attention import split_attention
        split_attention(b for _, b in bb.blocks("text")[:1])  # an attention the fused path does not know
    if case == "deep-prompt-past-prefix":
        deep, start = [None, torch.randn(3, bb.text_width)], 3  # slots 3..5: two past the prefix (5)
    prefix, tokens = prompts._shared_prefix(prompts.ctx), prompts.tokens
    if case == "eot-in-prefix":
        prefix = prefix[:, :-1]
        tokens = bb.tokenize(["x"] * len(NAMES))  # end of text at position 2, inside a 4-token prefix
        suffix = prompts.embeddings()[:, prefix.shape[1]:]
    else:
        suffix = prompts.token_suffix
    assert not text_prefix.shared_prefix_ok(bb, prefix, tokens, deep, start)
    calls = _spy(monkeypatch)
    with torch.no_grad():
        feats = bb.encode_text_shared(prefix, suffix, tokens, deep, start)[0]
        ref = bb.encode_text_embeddings(torch.cat([prefix.expand(len(NAMES), -1, -1), suffix], 1), tokens,
                                        deep, start)
    assert calls == [] and torch.equal(feats, ref)


def test_shared_path_runs_fewer_text_flops():
    """The point of it: the tower runs each class's suffix, not its whole prompt."""
    from torch.utils.flop_counter import FlopCounterMode

    bb = make_backbone()
    method = build_method("coop", {"n_ctx": 16}, bb, NAMES, TEMPLATE)
    prompts = method.prompts
    with torch.no_grad():
        with FlopCounterMode(display=False) as shared:
            prompts.text_features()
        with FlopCounterMode(display=False) as full:
            _full(prompts, prompts.ctx)
    assert shared.get_total_flops() < 0.6 * full.get_total_flops()
