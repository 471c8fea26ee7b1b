"""Per-process CPU settings applied where a run starts, and the heap policy (adapt/process.py)."""
from __future__ import annotations

import pytest
import torch

from adapt import process
from conftest import make_backbone

MIB = 1 << 20


@pytest.fixture
def thresholds(monkeypatch):
    """The mmap thresholds adapt asks glibc for (recorded, not applied); the policy is restored."""
    calls = []
    monkeypatch.setattr(process, "set_mmap_threshold", lambda t: calls.append(t) or True)
    monkeypatch.setattr(process, "_heap_policy", None)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    return calls


def test_cpu_runs_start_the_heap_undecided_unless_the_user_chose(thresholds, monkeypatch):
    process.prepare_cpu_process("cpu")
    assert thresholds == [MIB] and process.heap_policy() == "undecided"
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # the user's own setting wins
    process.prepare_cpu_process("cpu")
    assert thresholds == [MIB] and process.heap_policy() is None
    process.reuse_heap()  # an unmanaged heap is never touched
    process.bound_heap()
    assert thresholds == [MIB] and process.heap_policy() is None
    assert torch.set_flush_denormal(True)  # supported on this CPU, so the call above took effect


def test_the_first_decision_sticks_and_bounded_is_final(thresholds):
    process.manage_heap()
    process.reuse_heap()
    process.reuse_heap()
    assert thresholds == [MIB, 32 * MIB] and process.heap_policy() == "reuse"
    process.bound_heap()
    process.reuse_heap()  # memory over speed for the rest of the run
    assert thresholds == [MIB, 32 * MIB, MIB] and process.heap_policy() == "bounded"
    process.manage_heap()  # a new run decides anew
    process.bound_heap()
    process.reuse_heap()
    assert thresholds[3:] == [MIB] and process.heap_policy() == "bounded"


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_first_graph_building_pass_decides(thresholds, checkpointing):
    bb = make_backbone(grad_checkpointing=checkpointing)
    process.manage_heap()
    tokens = bb.tokenize(["a photo of a cat.", "a photo of a dog."])
    x = bb.embed_tokens(tokens).detach()
    with torch.no_grad():
        bb.encode_text_embeddings(x, tokens)  # no gradients: nothing decided
    bb.encode_text_embeddings(x, tokens)  # gradients on, but nothing requires them: no graph
    bb.encode_image(torch.randn(2, 3, bb.image_size, bb.image_size))
    assert process.heap_policy() == "undecided" and thresholds == [MIB]
    bb.encode_text_embeddings(x.requires_grad_(True), tokens).sum().backward()
    assert process.heap_policy() == ("bounded" if checkpointing else "reuse")
    assert thresholds == [MIB] + ([] if checkpointing else [32 * MIB])


def test_the_real_allocator_call_takes_effect_on_glibc():
    # fixing the threshold is one-way (glibc stops moving it); 1 MiB is where every run_fit in
    # the suite starts the heap anyway
    assert process.set_mmap_threshold(process.BOUNDED_THRESHOLD) is True
