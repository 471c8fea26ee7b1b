"""Per-process settings for CPU runs, applied where a run starts (``run_fit`` / ``run_test``),
never at import: a library must not change its host's allocator or float modes just by being
imported.

The heap policy. glibc hands out every block above its mmap threshold as a fresh mapping, and
each fresh page costs a page fault on first touch. Whether freed activations should come back
as reusable heap or go back to the OS is a speed / memory trade-off, measured on ViT-B/16 here
(``python experiments/heap_policy.py``, 2 threads; experiments/results/heap_policy.md):

* ``reuse``: the threshold fixed at glibc's largest, 32 MiB, so freed blocks up
  to that size are reused without faults. The 100-class CoOp text pass (forward + backward):
  3.7 s with 0.2 s of kernel time, against 4.9 s with 2.1 s under ``bounded``.
* ``bounded``: the threshold fixed at 1 MiB, so every larger tensor goes back to the OS when
  freed. A checkpointed, chunked many-class step interleaves long-lived saved inputs with
  short-lived recomputed activations; in a reusing heap the holes between them are never
  returned: the 1000-class CoOp step peaks at 4.0 GB under ``reuse``, 2.3 GB here (and takes
  55 s instead of 47 s).

A run starts undecided, under ``bounded``, and decides at its first pass that builds a graph
(``ClipBackbone`` reports each block): checkpointed, the recipe or the automatic memory plan
asked for memory over speed, and the run stays ``bounded``; not checkpointed, it switches to
``reuse`` (and to ``bounded`` for good if a later pass checkpoints). Deciding before any
training pass matters: a heap that reused blocks before a checkpointed step holds more during
it (the 1000-class CoOp step in experiments/bench_speed.py: 2.64 GB in a run that had started
each workload under ``reuse``, 2.31 GB in the committed run). Runs without gradients (evaluation,
feature extraction) stay ``bounded``. Nothing changes unless adapt set up the process
(``prepare_cpu_process``) and the user has not set ``MALLOC_MMAP_THRESHOLD_``.
"""
from __future__ import annotations

import ctypes
import logging
import os
from typing import Optional

import torch

log = logging.getLogger(__name__)
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
REUSE_THRESHOLD = 32 << 20  # glibc's maximum (HEAP_MAX_SIZE / 2 on 64-bit)
BOUNDED_THRESHOLD = 1 << 20

# None: adapt does not manage this process's heap; else "undecided", "reuse" or "bounded"
_heap_policy: Optional[str] = None


def set_mmap_threshold(threshold: int) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes (which also stops glibc from moving it
    itself). Returns whether it took effect (False off glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))


def manage_heap() -> bool:
    """Start this process's heap undecided (``bounded`` until the first graph-building pass, see
    the module docstring), unless the user chose the threshold (MALLOC_MMAP_THRESHOLD_).
    Returns whether adapt now manages the heap."""
    global _heap_policy
    ok = "MALLOC_MMAP_THRESHOLD_" not in os.environ and set_mmap_threshold(BOUNDED_THRESHOLD)
    _heap_policy = "undecided" if ok else None
    return ok


def heap_policy() -> Optional[str]:
    """The state of this process's heap under adapt: None (not managed), "undecided", "reuse"
    or "bounded"."""
    return _heap_policy


def bound_heap() -> None:
    """A checkpointed pass ran: memory before speed for the rest of the run. Cheap when there is
    nothing to do (the backbone calls it for every checkpointed block)."""
    global _heap_policy
    # an undecided run is already at the bounded threshold
    if _heap_policy == "undecided" or (_heap_policy == "reuse" and set_mmap_threshold(BOUNDED_THRESHOLD)):
        _heap_policy = "bounded"
        log.debug("activation checkpointing: freed tensors above 1 MiB go back to the OS")


def reuse_heap() -> None:
    """A pass built a graph without checkpointing: an undecided run reuses freed blocks from
    now on. Cheap when there is nothing to do (called for every such block)."""
    global _heap_policy
    if _heap_policy == "undecided" and set_mmap_threshold(REUSE_THRESHOLD):
        _heap_policy = "reuse"
        log.debug("no activation checkpointing: freed blocks up to 32 MiB are reused")


def prepare_cpu_process(accelerator: str) -> None:
    """Flush denormals (they made CPU steps 2-6x slower here) and, for CPU runs, start the heap
    policy undecided (see the module docstring), unless the user set MALLOC_MMAP_THRESHOLD_."""
    torch.set_flush_denormal(True)
    if accelerator == "cpu" or not torch.cuda.is_available():
        manage_heap()
