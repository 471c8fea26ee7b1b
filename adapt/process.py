"""Per-process settings for CPU runs, applied where a run starts (``run_fit`` / ``run_test``),
never at import: a library must not change its host's allocator or float modes just by being
imported."""
from __future__ import annotations

import ctypes
import logging
import os

import torch

log = logging.getLogger(__name__)
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold (normally it grows to 32 MB after the first large free), so
    every tensor above ``threshold`` bytes gets its own mapping and goes back to the OS when
    freed. Without it the heap keeps freed activations between long-lived ones (fragmentation),
    and a checkpointed, chunked many-class step holds more than is live. The speed benchmark's
    memory figures are measured with it. Same as starting the process with
    MALLOC_MMAP_THRESHOLD_=1048576. Returns whether it took effect (False off glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))


def prepare_cpu_process(accelerator: str) -> None:
    """Flush denormals (they made CPU steps 2-6x slower here) and, for CPU runs, return freed
    activations to the OS, unless the user set MALLOC_MMAP_THRESHOLD_ themselves."""
    torch.set_flush_denormal(True)
    if accelerator == "cpu" or not torch.cuda.is_available():
        if "MALLOC_MMAP_THRESHOLD_" not in os.environ and return_freed_memory():
            log.debug("glibc mmap threshold fixed at 1 MiB")
