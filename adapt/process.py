"""Per-process settings for CPU runs, applied where a run starts (``run_fit`` / ``run_test``),
never at import: a library must not change its host's allocator or float modes just by being
imported.

The heap policy. glibc hands out every block above its mmap threshold as a fresh mapping, and
each fresh page costs a page fault on first touch. Whether freed activations should come back
as reusable heap or go back to the OS is a speed / memory trade-off, measured on ViT-B/16 here
(``python experiments/heap_policy.py``, 2 threads; experiments/results/heap_policy.md):

* ``reuse`` (a run's start): the threshold fixed at glibc's largest, 32 MiB, so freed blocks up
  to that size are reused without faults. The 100-class CoOp text pass (forward + backward):
  3.6 s with 0.1 s of kernel time, against 5.4 s with 2.0 s under ``bounded``.
* ``bounded``: the threshold fixed at 1 MiB, so every larger tensor goes back to the OS when
  freed. A checkpointed, chunked many-class step interleaves long-lived saved inputs with
  short-lived recomputed activations; in a reusing heap the holes between them are never
  returned: the 1000-class CoOp step peaks at 4.2 GB under ``reuse``, 2.3 GB here (and takes
  58 s instead of 46 s).

A run switches from ``reuse`` to ``bounded``, once and for the rest of the run, the first time
a pass runs with activation checkpointing (``ClipBackbone`` calls ``bound_heap``): the recipe
or the automatic memory plan asked for memory over speed. Nothing changes unless adapt set up
the process (``prepare_cpu_process``) and the user has not set ``MALLOC_MMAP_THRESHOLD_``.
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

# None: adapt does not manage this process's heap; else "reuse" or "bounded"
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


def return_freed_memory(threshold: int = BOUNDED_THRESHOLD) -> bool:
    """Every tensor above ``threshold`` bytes gets its own mapping and goes back to the OS when
    freed: the ``bounded`` policy, for the whole process (same as starting the process with
    MALLOC_MMAP_THRESHOLD_=1048576). Returns whether it took effect."""
    return set_mmap_threshold(threshold)


def manage_heap(policy: str = "reuse") -> bool:
    """Put this process's heap under ``policy`` ("reuse" or "bounded") and let ``bound_heap``
    switch it later, unless the user chose the threshold (MALLOC_MMAP_THRESHOLD_). Returns
    whether adapt now manages the heap."""
    global _heap_policy
    if policy not in ("reuse", "bounded"):
        raise ValueError(f"heap policy must be 'reuse' or 'bounded', not {policy!r}")
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        _heap_policy = None
        return False
    ok = set_mmap_threshold(REUSE_THRESHOLD if policy == "reuse" else BOUNDED_THRESHOLD)
    _heap_policy = policy if ok else None
    return ok


def heap_policy() -> Optional[str]:
    """The policy adapt set for this process's heap (None: not managed)."""
    return _heap_policy


def bound_heap() -> None:
    """Memory before speed from now on: a managed ``reuse`` heap switches to ``bounded``. Called
    by the backbone for every checkpointed pass; cheap when there is nothing to do."""
    global _heap_policy
    if _heap_policy == "reuse" and set_mmap_threshold(BOUNDED_THRESHOLD):
        _heap_policy = "bounded"
        log.debug("activation checkpointing: freed tensors above 1 MiB now go back to the OS")


def prepare_cpu_process(accelerator: str) -> None:
    """Flush denormals (they made CPU steps 2-6x slower here) and, for CPU runs, start the heap
    under the ``reuse`` policy (see the module docstring), unless the user set
    MALLOC_MMAP_THRESHOLD_ themselves."""
    torch.set_flush_denormal(True)
    if accelerator == "cpu" or not torch.cuda.is_available():
        if manage_heap("reuse"):
            log.debug("heap policy: reuse (glibc mmap threshold fixed at 32 MiB)")
