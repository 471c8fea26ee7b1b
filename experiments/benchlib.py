"""Measuring helpers for experiments/bench_speed.py: peak resident memory, timing, the machine's
fp32 matrix-multiply rate, and a "reference mode" switch on the backbone."""
from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import torch


class PeakMemory:
    """Peak resident set size (MB) of this process since the last ``reset``.

    Linux: ``reset`` writes 5 to /proc/self/clear_refs, which sets the kernel's high-water mark
    (VmHWM) to the current RSS, and ``peak`` reads VmHWM: exact, however short the peak. Freed
    heap is handed back first (``malloc_trim``) so an earlier workload's leftovers do not count.
    Elsewhere a thread samples the RSS every millisecond."""

    def __init__(self) -> None:
        self._libc = _libc()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.exact = _status("VmHWM") is not None
        except OSError:
            self.exact = False
        self._sampled = 0.0
        self._stop: Optional[threading.Event] = None

    def reset(self) -> None:
        gc.collect()
        if self._libc is not None:
            self._libc.malloc_trim(0)
        if self.exact:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return
        if self._stop is not None:
            self._stop.set()
        self._sampled = current_rss_mb()
        self._stop = stop = threading.Event()

        def sample():
            while not stop.is_set():
                self._sampled = max(self._sampled, current_rss_mb())
                time.sleep(0.001)

        threading.Thread(target=sample, daemon=True).start()

    def peak(self) -> float:
        if self.exact:
            return _status("VmHWM")
        return max(self._sampled, current_rss_mb())


def load_average() -> list[float]:
    try:
        return [float(v) for v in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return []


def current_rss_mb() -> float:
    value = _status("VmRSS")
    if value is not None:
        return value
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _status(field: str) -> Optional[float]:
    try:
        text = open("/proc/self/status").read()
    except OSError:
        return None
    m = re.search(rf"{field}:\s+(\d+)\s+kB", text)
    return int(m.group(1)) / 1024.0 if m else None


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


def timed(fn: Callable[[], object], steps: int, warmup: int, memory: PeakMemory) -> tuple[float, float]:
    """(seconds per call, peak RSS MB during the timed calls) after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    memory.reset()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    seconds = (time.perf_counter() - start) / max(1, steps)
    return seconds, memory.peak()


def interleaved(modes: dict, memory: PeakMemory, warmup: int = 0,
                calls_out: Optional[dict] = None) -> dict[str, tuple[float, float]]:
    """Time several modes of one workload in alternating rounds (A B A B ...), so that a change
    in the machine's load during the run (other processes on a shared machine) hits every mode
    alike. ``modes``: name -> (fn, calls). Returns name -> (mean seconds per call, peak RSS MB of
    its calls), each call's peak measured on its own; ``calls_out`` (a dict) receives name ->
    every call's seconds, in round order."""
    for fn, _ in modes.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in modes}
    peaks = {name: 0.0 for name in modes}
    for r in range(max(calls for _, calls in modes.values())):
        for name, (fn, calls) in modes.items():
            if r >= calls:
                continue
            memory.reset()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], memory.peak())
    if calls_out is not None:
        calls_out.update(times)
    return {name: (sum(t) / len(t), peaks[name]) for name, t in times.items()}


def in_reference_mode(backbone, fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with reference_mode(backbone):
            return fn()
    return run


def flop_counter():
    """torch's FlopCounterMode, also counting the CPU's fused attention kernel: torch counts
    the CUDA kernels of ``scaled_dot_product_attention`` but not the one the CPU runs
    (``_scaled_dot_product_flash_attention_for_cpu``, forward and backward), so without this the
    fast blocks' attention products count as zero FLOPs while open_clip's bmm-based ones count.
    Counted as the same products written out would be."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten

    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        # the four products of the gradient, as attention written out needs them; torch's CUDA
        # formula adds the scores the flash kernel recomputes, which the work itself does not need
        return 2 * fc.sdpa_flop_count(query, key, value)

    return fc.FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward})


def matmul_gflops(n: int = 2048, repeats: int = 5, operands=None) -> float:
    """The best of ``repeats`` timings of an fp32 n×n×n matrix product, in GFLOP/s."""
    a, b = operands if operands is not None else (torch.randn(n, n), torch.randn(n, n))
    for _ in range(2 if operands is None else 1):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


@contextmanager
def reference_mode(backbone):
    """What the original implementations do: every prompt through all of the context length (no
    truncation to the longest prompt), no chunking, no checkpointing, open_clip's own blocks."""
    cfg = backbone.config
    saved = (cfg.text_chunk_size, cfg.grad_checkpointing, cfg.fast_blocks, cfg.image_chunk_size)
    backbone._text_is_causal = lambda: False  # the wrapper then keeps every position
    # open_clip's own blocks (nn.MultiheadAttention), the whole batch in one pass
    cfg.text_chunk_size, cfg.grad_checkpointing, cfg.fast_blocks, cfg.image_chunk_size = 0, False, False, 0
    try:
        yield
    finally:
        del backbone._text_is_causal
        cfg.text_chunk_size, cfg.grad_checkpointing, cfg.fast_blocks, cfg.image_chunk_size = saved


def linear_estimate(points: list[tuple[float, float]], x: float) -> float:
    """Extrapolate y(x) along the line through two measured (x, y) points. What is extrapolated
    (time, memory against the class count) grows with x, so a falling line is the machine's noise
    between the two measurements: its slope is floored at 0, never extrapolated below zero."""
    (x0, y0), (x1, y1) = points
    return y0 + max(0.0, (y1 - y0) / (x1 - x0)) * (x - x0)


def rates_beside_matmul(modes: dict, flops: dict, rounds: int, memory: PeakMemory, n: int = 2048) -> dict:
    """FLOP rates of several modes of one workload, each as a fraction of the fp32 n×n matrix
    product timed between them (A: matmul, B, C, matmul, B, C, ...). On a machine shared with
    other processes the load changes by the second; the best of each (its least disturbed
    round) is what the hardware and the code allow. ``modes``: name -> fn (one untimed warm-up
    call each). Returns name -> {seconds, gflops, fraction, peak_rss_mb} plus "matmul_gflops"."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for fn in modes.values():
        fn()
    best = {name: float("inf") for name in modes}
    peaks = {name: 0.0 for name in modes}
    matmul = 0.0
    for _ in range(rounds):
        matmul = max(matmul, matmul_gflops(n, 3, (a, b)))
        for name, fn in modes.items():
            memory.reset()
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
            peaks[name] = max(peaks[name], memory.peak())
    matmul = max(matmul, matmul_gflops(n, 3, (a, b)))
    out = {name: {"seconds": s, "gflops": flops[name] / s / 1e9, "fraction": flops[name] / s / 1e9 / matmul,
                  "peak_rss_mb": peaks[name]} for name, s in best.items()}
    out["matmul_gflops"] = matmul
    return out


# ------------------------------------------------------------------------------ the heap -------
HEAP_POLICY = ("adapt's heap policy, started anew before each workload as a run starts it: every block "
               "above 1 MiB returned to the OS, until a graph-building pass without checkpointing "
               "switches to reusing freed blocks up to 32 MiB (adapt/process.py)")


def start_heap() -> str:
    """Put the heap under the policy a run starts with (adapt/process.py); call again before
    each workload so each is measured as its own run would be. Returns the policy's label."""
    from adapt import process

    if process.manage_heap():
        return HEAP_POLICY
    return "not managed (MALLOC_MMAP_THRESHOLD_ set, or not glibc)"


class BenchStart:
    """What a benchmark on a random-weight backbone starts with: the clock and load average, the
    heap policy, a peak-memory meter, the backbone (``cfg["model"]``, seeded) and a seeded
    generator for its inputs."""

    def __init__(self, cfg: dict, build: bool = True):
        import time

        import torch

        self.start, self.load_before = time.perf_counter(), load_average()
        self.allocator = start_heap()
        self.memory = PeakMemory()
        torch.manual_seed(0)
        self.backbone = None
        if build:
            from adapt.backbone import BackboneConfig, build_backbone

            self.backbone = build_backbone(BackboneConfig(name=cfg["model"], pretrained=None))
        self.generator = torch.Generator().manual_seed(0)


# ------------------------------------------------------------------------------ results -------
COMMITTED = Path(__file__).resolve().parent / "results"


def machine(threads: int, load_before) -> dict:
    """What a benchmark's figures were measured on: threads, versions, load before and after."""
    import platform

    import torch

    return {"threads": threads, "python": platform.python_version(), "torch": torch.__version__,
            "load_average_before": load_before, "load_average_after": load_average()}


def classnames(n: int) -> list[str]:
    """The first ``n`` ImageNet class names (open_clip's list): real words for the text tower."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES[:n])


def output_dir(out, quick: bool, stem: str) -> Path:
    """Where a benchmark writes: ``--out`` if given, else a new temporary folder. A ``--quick``
    (or partial) run, whose numbers mean nothing, never writes over the committed figures."""
    if out is None:
        return Path(tempfile.mkdtemp(prefix=f"{stem}_out_"))
    path = Path(out).expanduser().resolve()
    if quick and path == COMMITTED.resolve():
        raise SystemExit("--quick / --only figures are toy sizes or a partial run and must not "
                         f"replace the committed ones in {COMMITTED}; give another --out, or run "
                         "the full benchmark")
    path.mkdir(parents=True, exist_ok=True)
    return path


def targets_met(targets, ratios: dict) -> dict:
    """``targets``: (key, label, goal text, test) rows -> the measured value and whether it met."""
    return {key: {"label": label, "goal": goal, "value": ratios[key], "met": bool(test(ratios[key]))}
            for key, label, goal, test in targets if key in ratios}


def write_result(out: Path, stem: str, result: dict, text: str) -> None:
    """``<stem>.json`` and ``<stem>.md`` in ``out``, each written to a temporary file and renamed."""
    for name, body in ((f"{stem}.json", json.dumps(result, indent=2)), (f"{stem}.md", text)):
        tmp = out / (name + ".tmp")
        tmp.write_text(body)
        os.replace(tmp, out / name)
    print(text)
    print(f"wrote {out / (stem + '.json')} and {stem}.md in {result['wall_seconds']:.0f}s")


def bench_cli(doc: str, argv, stem: str, quick: dict, full: dict):
    """The command line of a per-image benchmark: ``--quick`` (toy sizes on a tiny model),
    ``--out``, ``--threads``; sets the threads, flushes denormals, quiets the loggers. Returns
    (args, the sizes to run, the output folder)."""
    import argparse
    import logging

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="toy sizes on a tiny model (smoke test)")
    ap.add_argument("--out", default=None, help="folder for the figures (default: a new temporary folder)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    logging.getLogger("adapt").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    out = output_dir(args.out, args.quick, stem)
    print(f"figures will be written to {out}", flush=True)
    return args, dict(quick if args.quick else full), out


def target_lines(targets, measured: dict, value=lambda key, v: f"{v:.2f}x") -> list[str]:
    """The markdown table of targets: label, measured value, goal, met."""
    lines = ["", "| target | measured | goal | met |", "|---|---:|---|---|"]
    for key, label, goal, _ in targets:
        t = measured[key]
        lines.append(f"| {label} | {value(key, t['value'])} | {goal} | {'yes' if t['met'] else 'NO'} |")
    return lines
