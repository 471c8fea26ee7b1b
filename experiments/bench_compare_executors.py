"""Throughput of ``adapt compare`` under Ray against the local executor, on one machine.

    python experiments/bench_compare_executors.py [--quick] [--out DIR] [--rounds 1]

The world comparison of 6 base-to-novel recipes (coop, cocoop, kgcoop, vpt, ivlp, maple: each
recipe's own settings, the shipped tiny-vit-p4 on world_colour, 16 shots) x 2 seeds, run twice as
`adapt compare` in a fresh process: ``--executor ray --jobs 2`` with one thread per run
(``launcher.threads=1``, a local cluster of 2 CPUs) and the local executor with two threads
(``launcher.threads=2``). Each arm starts from an empty feature cache of its own (both pay the
encoding; the world's images are shared) and writes its own runs; with ``--rounds N`` the arms
alternate, so a load change on a shared machine hits both alike. Target: local wall time / Ray
wall time >= 1.5 on 2 cores.

Also measured, each in a fresh process: Ray's startup (``ray.init`` of a 2-CPU local cluster),
the first task's round trip (a worker process started and ``adapt.run`` imported in it), a warm
no-op task's round trip (the per-task overhead of the scheduler), and ``ray.shutdown``; and how far
the two arms' tables differ (threads change float summation order; max |difference| of any
metric). Writes bench_compare_executors.json and .md to --out (default: a new temporary folder).
``--quick`` runs 2 recipes x 1 seed for 2 epochs (a smoke test: the numbers mean nothing).
Run it on an otherwise idle machine: both arms want both cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.benchlib import load_average, machine, output_dir, target_lines, targets_met, write_result  # noqa: E402

STEM = "bench_compare_executors"
WORLD = ["backbone.name=tiny-vit-p4", "backbone.pretrained=world", "data.dataset=world_colour",
         "data.root=null", "data.num_workers=0", "logger.csv=false"]
FULL = dict(methods=["coop", "cocoop", "kgcoop", "vpt", "ivlp", "maple"], seeds=[1, 2], extra=[])
QUICK = dict(methods=["coop", "kgcoop"], seeds=[1], extra=["trainer.max_epochs=2", "data.shots=4"])
ARMS = {"ray": ["--executor", "ray", "--jobs", "2", "launcher.threads=1", "launcher.num_cpus=2"],
        "local": ["launcher.threads=2"]}
TARGETS = [("throughput", "local wall time / Ray (--jobs 2, 1 thread per run) wall time", ">= 1.5x",
            lambda v: v >= 1.5)]

PROBE = """
import json, time, sys
t0 = time.perf_counter()
import ray
ray.init(num_cpus=2, log_to_driver=False, configure_logging=False)
t1 = time.perf_counter()
@ray.remote(num_cpus=1)
def cold():
    import adapt.run  # what a comparison's first task imports
    return 0
@ray.remote(num_cpus=1)
def noop():
    return 0
ray.get(cold.remote())
t2 = time.perf_counter()
ray.get(noop.remote())
warm = []
for _ in range(int(sys.argv[1])):
    s = time.perf_counter(); ray.get(noop.remote()); warm.append(time.perf_counter() - s)
t3 = time.perf_counter()
ray.shutdown()
t4 = time.perf_counter()
print(json.dumps({"init_s": t1 - t0, "first_task_s": t2 - t1,
                  "warm_task_ms": 1000 * sum(warm) / len(warm), "shutdown_s": t4 - t3}))
"""


def recipe_paths(methods) -> list[str]:
    return [str(ROOT / "recipes" / m / "base2novel.yaml") for m in methods]


def run_arm(name: str, sizes: dict, work: Path, round_: int) -> dict:
    out = work / f"{name}{round_}"
    from adapt.data.world.build import cache_root

    # a fresh feature cache per arm (both pay the encoding); the world's images stay shared (the
    # same files for both, made once: not what is measured)
    env = dict(os.environ, ADAPT_CACHE_DIR=str(work / f"cache-{name}{round_}"), ADAPT_WORLD_CACHE=str(cache_root()),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "adapt.cli", "compare", *recipe_paths(sizes["methods"]), "--seeds",
           *map(str, sizes["seeds"]), "--out", str(out), *ARMS[name], *WORLD, *sizes["extra"]]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} arm failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    runs = json.loads((out / "comparison.json").read_text())["runs"]
    return {"wall_s": wall, "runs": len(runs), "out": str(out),
            "fit_s_sum": sum(r.get("fit_seconds") or 0 for r in runs),
            "metrics": {f"{r['label']}/{r['seed']}": {k: v for k, v in r.items() if k.endswith(("_acc", "hm"))}
                        for r in runs}}


def ray_overheads(warm_tasks: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE, str(warm_tasks)], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"Ray probe failed:\n{proc.stderr[-3000:]}")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    figures["process_s"] = time.perf_counter() - start
    return figures


def max_difference(a: dict, b: dict) -> float:
    return max((abs(a[run][k] - b[run][k]) for run in a for k in a[run] if run in b and k in b[run]), default=0.0)


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 recipes x 1 seed, 2 epochs (smoke test)")
    ap.add_argument("--out", default=None, help="folder for the figures (default: a new temporary folder)")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds of the two arms")
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    out = output_dir(args.out, args.quick, STEM)
    print(f"figures will be written to {out}", flush=True)
    load_before, start = load_average(), time.perf_counter()
    arms: dict[str, list[dict]] = {"ray": [], "local": []}
    with tempfile.TemporaryDirectory(prefix="bench_compare_") as tmp:
        for r in range(args.rounds):
            for name in (("ray", "local") if r % 2 == 0 else ("local", "ray")):
                arms[name].append(run_arm(name, sizes, Path(tmp), r))
                print(f"round {r + 1}: {name} {arms[name][-1]['wall_s']:.1f} s", flush=True)
        overheads = ray_overheads(5 if args.quick else 50)
    wall = {name: min(a["wall_s"] for a in runs) for name, runs in arms.items()}
    ratios = {"throughput": wall["local"] / wall["ray"]}
    targets = targets_met(TARGETS, ratios)
    n_runs = arms["ray"][0]["runs"]
    diff = max_difference(arms["ray"][0]["metrics"], arms["local"][0]["metrics"])
    result = {"quick": args.quick, "methods": sizes["methods"], "seeds": sizes["seeds"], "runs": n_runs,
              "rounds": args.rounds, "wall_seconds_per_arm": {k: [a["wall_s"] for a in v] for k, v in arms.items()},
              "fit_seconds_sum": {k: v[0]["fit_s_sum"] for k, v in arms.items()},
              "ray_overheads": overheads, "max_metric_difference": diff, "targets": targets,
              "machine": machine(2, load_before), "wall_seconds": time.perf_counter() - start}
    o = overheads
    text = "\n".join([
        f"# adapt compare: Ray (--jobs 2, 1 thread per run) against local (2 threads){' [--quick]' if args.quick else ''}",
        "", f"{len(sizes['methods'])} world recipes ({', '.join(sizes['methods'])}) x {len(sizes['seeds'])} seeds = "
        f"{n_runs} runs per arm; best of {args.rounds} alternating round(s); each arm a fresh process and "
        "an empty feature cache.", "",
        "| arm | wall s | sum of the runs' fit s |", "|---|---:|---:|",
        *[f"| {name} | {wall[name]:.1f} | {result['fit_seconds_sum'][name]:.1f} |" for name in ("local", "ray")],
        *target_lines(TARGETS, targets),
        "", f"Ray on this machine: ray.init of a 2-CPU local cluster {o['init_s']:.1f} s (import included); first "
        f"task (worker started, adapt.run imported) {o['first_task_s']:.1f} s; a warm no-op task "
        f"{o['warm_task_ms']:.1f} ms; ray.shutdown {o['shutdown_s']:.1f} s.",
        f"Tables: max |difference| of any metric between the arms {diff:.3g} points (threads change the "
        "order of float sums).",
        f"Load average before {load_before}, after {result['machine']['load_average_after']}."])
    write_result(out, STEM, result, text + "\n")


if __name__ == "__main__":
    main()
