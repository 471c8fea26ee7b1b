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


def test_cpu_runs_start_with_a_reusing_heap_unless_the_user_chose(thresholds, monkeypatch):
    process.prepare_cpu_process("cpu")
    assert thresholds == [32 * MIB] and process.heap_policy() == "reuse"
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # the user's own setting wins
    process.prepare_cpu_process("cpu")
    assert thresholds == [32 * MIB] and process.heap_policy() is None
    process.bound_heap()  # an unmanaged heap is never touched
    assert thresholds == [32 * MIB]
    assert torch.set_flush_denormal(True)  # supported on this CPU, so the call above took effect


def test_bound_heap_switches_a_managed_heap_once(thresholds):
    process.bound_heap()
    assert thresholds == []  # not managed: nothing
    process.manage_heap("reuse")
    process.bound_heap()
    process.bound_heap()
    assert thresholds == [32 * MIB, MIB] and process.heap_policy() == "bounded"
    process.manage_heap("reuse")  # a new run starts reusing again
    assert thresholds[-1] == 32 * MIB and process.heap_policy() == "reuse"
    with pytest.raises(ValueError, match="'reuse' or 'bounded'"):
        process.manage_heap("fast")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_checkpointed_pass_bounds_the_heap_and_a_plain_one_does_not(thresholds, checkpointing):
    bb = make_backbone(grad_checkpointing=checkpointing)
    process.manage_heap("reuse")
    tokens = bb.tokenize(["a photo of a cat.", "a photo of a dog."])
    x = bb.embed_tokens(tokens).detach().requires_grad_(True)
    with torch.no_grad():
        bb.encode_text_embeddings(x, tokens)  # no gradients: never checkpointed
    assert process.heap_policy() == "reuse"
    bb.encode_text_embeddings(x, tokens).sum().backward()
    assert process.heap_policy() == ("bounded" if checkpointing else "reuse")
    assert thresholds == [32 * MIB] + ([MIB] if checkpointing else [])


def test_the_real_allocator_call_takes_effect_on_glibc():
    # fixing the threshold is one-way (glibc stops moving it), so set the value this test
    # process runs under anyway: every run_fit in the suite starts the heap so
    assert process.set_mmap_threshold(process.REUSE_THRESHOLD) is True
