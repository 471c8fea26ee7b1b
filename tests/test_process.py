"""Per-process CPU settings applied where a run starts."""
from __future__ import annotations

import torch

from adapt import process


def test_cpu_runs_return_freed_memory_unless_the_user_chose(monkeypatch):
    calls = []
    monkeypatch.setattr(process, "return_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    process.prepare_cpu_process("cpu")
    assert calls == [1]
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # the user's own setting wins
    process.prepare_cpu_process("cpu")
    assert calls == [1]
    assert torch.set_flush_denormal(True)  # supported on this CPU, so the call above took effect
