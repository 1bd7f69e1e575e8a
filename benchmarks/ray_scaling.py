"""How evaluation throughput scales with Ray workers on a real zoo (default: the effnet zoo).

Side by side in one run, on the addition task: evaluations per second of

  (a) NGOpt, one candidate at a time        → data-parallel on Ray (each worker scores a shard)
  (b) TwoPointsDE, batches of 8             → candidate-parallel on Ray
  (c) gradient steps (mini-batches)         → data-parallel on Ray

for the local evaluator (workers=0, in this process, with 2 torch threads and with 1), one Ray
worker and two Ray workers (one CPU and one torch thread each). Ratios: 2 workers ÷ 1 worker, and
2 workers ÷ the faster local configuration. The searchers are the real plugins, driven by a
minimal ask → evaluate → tell loop (the runner's loop without its trace file), after a warm-up.
Ray is started once for the whole benchmark; the zoo must be in the cache (it is built if not).

    python benchmarks/ray_scaling.py                      # effnet zoo, ~3-4 min on 2 cores
    python benchmarks/ray_scaling.py --zoo tiny-clip --zoo-options "datasets=skdigits,lfw;max_n=400;pretrain_steps=40;ft_steps=15"
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import ray
import torch

import psutil  # noqa: I001  (importable once ray is: ray ships it)

from harness import registry
from harness.api import Candidate
from harness.config import RunConfig, resolve_options
from harness.evaluators import LocalEvaluator
from harness.problem import make_task, plan

WORKLOADS = {
    # name: (searcher, searcher options, batch size, what is counted)
    "(a) NGOpt, batch 1": ("nevergrad", {"optimizer": "NGOpt"}, 1, "evals/s"),
    "(b) TwoPointsDE, batch 8": ("nevergrad", {"optimizer": "TwoPointsDE"}, 8, "evals/s"),
    "(c) gradient steps": ("gradient", {"validate_every": 0}, 1, "steps/s"),
}


def drive(p, space, evaluator, workload: str, n: int, seed: int = 0) -> tuple[float, int]:
    """Run ``n`` evaluations of a workload's searcher; return (seconds, evaluations)."""
    name, opts, batch, _ = WORKLOADS[workload]
    cls = registry.load("searcher", name)
    searcher = cls(space, n, batch, seed, resolve_options(cls, opts, "searcher"))
    used, t0 = 0, time.perf_counter()
    while used < n:
        cands = searcher.ask(min(batch, n - used))[: n - used]
        evs = evaluator.evaluate(cands)
        searcher.tell(cands, evs)
        used += len(cands)
    dt = time.perf_counter() - t0
    searcher.close()
    return dt, used


def _cpu(proc) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def warm_up(evaluator, dim: int, batch: int) -> None:
    """First calls pay one-off costs (allocator, lazy init); keep them out of the timings."""
    x = np.zeros(dim)
    evaluator.evaluate([Candidate(x=x)] * batch)
    evaluator.evaluate([Candidate(x=x, grad=True, batch=12345)])
    evaluator.evaluate([Candidate(x=x)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", default="effnet")
    ap.add_argument("--zoo-options", default="")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--space", default="per_block")
    ap.add_argument("--evals", type=int, default=48, help="evaluations per (a) and (b) measurement")
    ap.add_argument("--steps", type=int, default=24, help="gradient steps per (c) measurement")
    ap.add_argument("--configs", default="local:2,local:1,ray:1,ray:2",
                    help="evaluators to compare: local:THREADS (this process) and ray:WORKERS")
    args = ap.parse_args(argv)

    from harness.ray_evaluator import RayEvaluator
    from harness.ray_worker import start_local_ray

    t_start = time.perf_counter()
    cfg = RunConfig(task="addition", task_options={"source": args.zoo, "source_options": args.zoo_options},
                    space=args.space, cache_dir=args.cache_dir, workers=2, quiet=True)
    p = plan(cfg)
    task = make_task(p)
    task.setup("cpu")
    space = task.space()
    print(f"addition on zoo {args.zoo}: {space.dim} coefficients ({args.space}); torch threads in this "
          f"process {torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f}", flush=True)
    start_local_ray(num_cpus=2, quiet=True)

    default_threads = torch.get_num_threads()
    configs = [c.strip() for c in args.configs.split(",")]
    rates: dict[tuple[str, str], float] = {}
    for conf in configs:
        kind, _, n = conf.partition(":")
        n = int(n or 1)
        t0 = time.perf_counter()
        if kind == "local":
            torch.set_num_threads(n)
            ev = LocalEvaluator(task)
        else:
            torch.set_num_threads(default_threads)
            ev = RayEvaluator(p, workers=n, mode="auto", quiet=True, task=task)
        t_setup = time.perf_counter() - t0
        try:
            warm_up(ev, space.dim, 8)
            procs = [psutil.Process(pid) for pid in (ev.worker_pids() if kind == "ray" else [os.getpid()])]
            for wl, (_, _, batch, unit) in WORKLOADS.items():
                count = args.steps if unit == "steps/s" else args.evals
                before = dict(ev.stats()) if kind == "ray" else None
                cpu0 = sum(_cpu(q) for q in procs)
                dt, used = drive(p, space, ev, wl, count)
                cpu = (sum(_cpu(q) for q in procs) - cpu0) / dt
                rates[(wl, conf)] = used / dt
                note = f"; CPU {cpu:.2f} cores ({'workers' if kind == 'ray' else 'this process'})"
                if kind == "ray":
                    after = ev.stats()
                    wall, busy = after["wall_s"] - before["wall_s"], after["worker_s"] - before["worker_s"]
                    calls = after["calls"] - before["calls"]
                    note += (f"; in evaluate {wall / dt:.0%} of the loop, workers computing {busy / (wall * n):.0%} "
                            f"of it, {1000 * (wall * n - busy) / max(calls, 1) / n:.1f} ms idle per worker per batch")
                print(f"  {conf} {wl}: {used / dt:.2f} {unit} ({used} in {dt:.1f} s){note}", flush=True)
        finally:
            ev.close()
        print(f"  ({conf}: set-up {t_setup:.1f} s)", flush=True)
    torch.set_num_threads(default_threads)

    ray.shutdown()

    cols = [c for c in ("local:2", "local:1", "ray:1", "ray:2") if c in configs]
    names = {"local:2": "local, 2 threads", "local:1": "local, 1 thread", "ray:1": "1 worker", "ray:2": "2 workers"}
    lines = ["", "| workload | unit | " + " | ".join(names[c] for c in cols) + " | 2 workers ÷ 1 | 2 workers ÷ best local |",
             "|---|---|" + "---|" * (len(cols) + 2)]
    for wl, (_, _, _, unit) in WORKLOADS.items():
        r = {c: rates.get((wl, c)) for c in cols}
        best_local = max([v for c, v in r.items() if c.startswith("local") and v] or [0])
        two, one = r.get("ray:2"), r.get("ray:1")
        lines.append(f"| {wl} | {unit} | " + " | ".join(f"{r[c]:.2f}" for c in cols)
                     + f" | {f'{two / one:.2f}×' if two and one else '-'} | {f'{two / best_local:.2f}×' if two and best_local else '-'} |")
    print("\n".join(lines))
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; load average now {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
