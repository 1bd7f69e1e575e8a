"""Performance figures, each a ratio measured side by side in one run.

    python -m harness bench perf                 # effnet zoo, all figures, ~6-8 min on 2 cores
    python -m harness bench perf --only throughput,overhead
    python benchmarks/perf.py --only throughput --repeats 7   # the same, with every knob

(1) throughput  one evaluation (merge + tail forward on the 6 × 64 search images) on the default
                path (channels-last input, chunks of ``chunk_size``, no autograd) ÷ the plain eager
                fp32 forward (merge included, ``torch.no_grad``, NCHW, one pass) of the same model on
                the same batch; interleaved, median over repeats. Other settings are printed beside.
(2) overhead    evaluations/s of the full runner (nevergrad NGOpt, trace written per evaluation) ÷
                evaluations/s of the bare merged forward on the same candidates; the runner's time
                is its search loop (the trace's clock), alternated with the bare timing, medians.
(3) fidelity    NGOpt per_layer, plain (300 evaluations) vs multi-fidelity screening
                (``-s screen=0.5 -s finalists=8``, 290 evaluations): test normalised accuracy per
                seed and the evaluation compute (full-set equivalents, from the traces). The runs
                are recorded under ``--results-dir`` and skipped when already complete.
(4) memory      peak RSS of a nevergrad run ÷ that of a gradient run (same task and data, each in
                its own fresh process); the same above the floor of a process that only
                imports torch, and above one that also sets the task up (the search's own share).
(5) selection   gradient searcher per_block, with all task vectors vs the top-b per block by
                |∂L/∂λ| at λ = 0 (paper App. D.6): bytes of task vectors held and test accuracy.

Timings share the CPU with whatever else runs; ratios are measured interleaved in this one process
so that load affects both sides alike.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from harness import registry
from harness.api import Candidate, HarnessError
from harness.composition import functional_forward
from harness.config import RunConfig, resolve_options
from harness.problem import make_task, plan
from harness.runner import run
from harness.selection import select_informative

FIGURES = ("throughput", "overhead", "fidelity", "memory", "selection")


def _task(searcher="nevergrad", space="per_layer", seed=0, task_options=None):
    p = plan(RunConfig(task="addition", searcher=searcher, space=space, seed=seed, quiet=True,
                       task_options=dict(task_options or {})))
    task = make_task(p)
    task.setup("cpu")
    return task


def _search_batch(task):
    names, xs, ys, _ = task.search.part(None)
    return torch.cat([x for x in xs if len(x)])


def _median_time(fn, args, n_inner=3):
    t = time.perf_counter()
    for a in args[:n_inner]:
        fn(a)
    return (time.perf_counter() - t) / min(n_inner, len(args))


def throughput(repeats: int) -> None:
    task = _task()
    src, comp = task.source, task.comp
    X = _search_batch(task)
    rng = np.random.default_rng(0)
    xs = [rng.uniform(-0.5, 0.5, comp.dim) for _ in range(3)]

    def merge(x):
        return comp.merge(torch.as_tensor(np.asarray(x, dtype=np.float32)))

    def plain(x):  # the baseline: eager fp32, NCHW, one pass, merge included
        with torch.no_grad():
            return functional_forward(src.tail, merge(x), X)

    def chunked(size, channels_last):
        def f(x):
            with torch.inference_mode():
                params = merge(x)
                outs = []
                for c in X.split(size):
                    if channels_last:
                        c = c.contiguous(memory_format=torch.channels_last)
                    outs.append(functional_forward(src.tail, params, c))
                return torch.cat(outs)
        return f

    def default(x):  # what every evaluation runs: the task's own path (heads and loss included)
        return task.evaluate([Candidate(x=x)])[0].loss

    def merge_only(x):
        with torch.no_grad():
            return merge(x)

    ref = plain(xs[0])
    fast = src.features(merge(xs[0]), X)
    err = float((ref - fast).abs().max() / ref.abs().max())
    variants = {"plain eager fp32 (baseline)": plain, "default evaluation path": default,
                "channels-last only (one pass)": chunked(len(X), True),
                "chunks of 96, NCHW": chunked(96, False)}
    for size in (64, 96, 192):
        variants[f"channels-last + chunks of {size}"] = chunked(size, True)
    variants["merge alone"] = merge_only
    for f in variants.values():
        f(xs[0])
    times = {k: [] for k in variants}
    for _ in range(repeats):
        for k, f in variants.items():
            times[k].append(_median_time(f, xs))
    base = statistics.median(times["plain eager fp32 (baseline)"])
    print(f"\n(1) throughput: one evaluation on {len(X)} search inputs, median of {repeats} interleaved "
          f"repeats, {torch.get_num_threads()} threads (source chunk_size={src.chunk_size}, "
          f"channels_last={src.channels_last})")
    for k, v in times.items():
        m = statistics.median(v)
        print(f"  {k:34s} {m * 1e3:7.1f} ms   {base / m:5.2f}x baseline")
    d = statistics.median(times["default evaluation path"])
    print(f"  => default ÷ baseline throughput: {base / d:.2f}x (target >= 2x); "
          f"max relative feature difference {err:.1e}")


def overhead(repeats: int, n: int, results_dir: str) -> None:
    cfg = RunConfig(task="addition", searcher="nevergrad", space="per_layer", budget=n, seed=0,
                    results_dir=results_dir, quiet=True, rerun=True)
    task = _task()
    src, comp = task.source, task.comp
    X = _search_batch(task)

    def bare(x):
        with torch.inference_mode():
            return src.features(comp.merge(torch.as_tensor(np.asarray(x, dtype=np.float32))), X)

    runner_t, bare_t = [], []
    for _ in range(repeats):
        rec = run(cfg, log=lambda m: None)
        rows = [json.loads(line) for line in open(f"{results_dir}/runs/{rec['run_id']}/trace.jsonl")]
        runner_t.append(rows[-1]["t"] / len(rows))
        xs = [np.asarray(r["x"]) for r in rows]
        t = time.perf_counter()
        for x in xs:
            bare(x)
        bare_t.append((time.perf_counter() - t) / len(xs))
    r, b = statistics.median(runner_t), statistics.median(bare_t)
    print(f"\n(2) harness overhead: {n} NGOpt evaluations through the runner vs the bare merged forward "
          f"on the same candidates, median of {repeats} alternated repeats")
    print(f"  runner {1 / r:6.2f} evals/s ({r * 1e3:.1f} ms each); bare {1 / b:6.2f} evals/s ({b * 1e3:.1f} ms)")
    print(f"  => runner ÷ bare evaluations/s: {b / r:.3f} (target >= 0.9)")


def _compute(results_dir: str, run_id: str) -> float:
    rows = [json.loads(line) for line in open(f"{results_dir}/runs/{run_id}/trace.jsonl")]
    return sum(r["weight"] for r in rows)


def fidelity(seeds: list[int], results_dir: str) -> None:
    arms = {"plain (300)": (300, {}), "screen 0.5 + 8 finalists (290)": (290, {"screen": 0.5, "finalists": 8})}
    res = {k: [] for k in arms}
    for seed in seeds:
        for k, (budget, opts) in arms.items():
            cfg = RunConfig(task="addition", searcher="nevergrad", space="per_layer", budget=budget, seed=seed,
                            searcher_options=opts, results_dir=results_dir, quiet=True)
            rec = run(cfg, log=lambda m: None)
            res[k].append((rec["final"]["normalized_acc"], _compute(results_dir, rec["run_id"]), rec["wall_time_s"]))
    print(f"\n(3) multi-fidelity: NGOpt per_layer on addition, seeds {seeds} (test normalised accuracy)")
    for k, v in res.items():
        accs = " ".join(f"{a:.4f}" for a, _, _ in v)
        print(f"  {k:32s} acc {accs}  mean {np.mean([a for a, _, _ in v]):.4f}; "
              f"compute {np.mean([c for _, c, _ in v]):.1f} full evaluations")
    (pa, pc), (ma, mc) = [(np.mean([a for a, _, _ in v]), np.mean([c for _, c, _ in v])) for v in res.values()]
    gaps = [m[0] - p[0] for p, m in zip(*res.values())]
    print(f"  => compute ratio {mc / pc:.2f} (target <= 0.5); accuracy gap {100 * (ma - pa):+.2f} points "
          f"(per seed {', '.join(f'{100 * g:+.1f}' for g in gaps)}; target: the same)")


# VmHWM, not getrusage's ru_maxrss: a child started from this (large) process inherits its
# ru_maxrss across exec, VmHWM belongs to the child's own address space.
_PEAK = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024.0"
_MEM_CHILD = f"""
import json, sys
from harness.config import RunConfig
from harness.runner import run
cfg = RunConfig(**json.loads(sys.argv[1]))
rec = run(cfg, log=lambda m: None)
print(json.dumps({{"peak": {_PEAK}}}))
"""


# The run's fixed cost: the runner's imports (torch, nevergrad, pandas) and the task set up (model,
# task vectors, cached inputs), without any search.
_SETUP_CHILD = f"""
import json, sys
import nevergrad, pandas
from harness.config import RunConfig
from harness.problem import make_task, plan, setup_task
setup_task(make_task(plan(RunConfig(**json.loads(sys.argv[1])))), "cpu")
print(json.dumps({{"peak": {_PEAK}}}))
"""


def _child(code: str, *args) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory(results_dir: str, budget: int) -> None:
    peaks = {}
    floor = _child(f"import json, torch; print(json.dumps({{'peak': {_PEAK}}}))")["peak"]
    setup = _child(_SETUP_CHILD, json.dumps({"task": "addition", "searcher": "nevergrad", "quiet": True}))["peak"]
    for searcher, space in (("nevergrad", "per_layer"), ("gradient", "per_block")):
        cfg = {"task": "addition", "searcher": searcher, "space": space, "budget": budget, "seed": 0,
               "results_dir": results_dir, "quiet": True, "rerun": True}
        peaks[searcher] = _child(_MEM_CHILD, json.dumps(cfg))["peak"]
    ng, gr = peaks["nevergrad"], peaks["gradient"]
    print(f"\n(4) memory: peak RSS of one run each ({budget} evaluations, own process)")
    print(f"  nevergrad {ng:.0f} MB; gradient {gr:.0f} MB; a process that only imports torch {floor:.0f} MB")
    print(f"  => nevergrad ÷ gradient: {ng / gr:.2f} (target <= 0.5); above the torch floor: "
          f"{(ng - floor) / max(gr - floor, 1e-9):.2f}")
    print(f"  a process that imports the runner and sets the task up, no search: {setup:.0f} MB; the search itself: "
          f"nevergrad +{ng - setup:.0f} MB, gradient +{gr - setup:.0f} MB => {(ng - setup) / max(gr - setup, 1e-9):.2f}")


def _drive(task, searcher_name, budget, options, seed=0):
    cls = registry.load("searcher", searcher_name)
    s = cls(task.space(), budget, 1, seed, resolve_options(cls, options, "searcher"))
    used = 0
    while used < budget:
        cands = s.ask(1)
        evs = task.evaluate(cands)
        s.tell(cands, evs)
        used += len(cands)
    x = s.recommend()
    s.close()
    return task.final(x)["normalized_acc"]


def selection(steps: int, bs: list[int]) -> None:
    task = _task("gradient", "per_block")
    T = task.comp.T
    opts = {"lr": 1e-2}
    rows = [("all task vectors", T, task.comp.memory_bytes(), _drive(task, "gradient", steps, opts))]
    for b in bs:
        task.compose(task.names)
        rep = select_informative(task, b)
        rows.append((f"top-{b} per block", b, rep["bytes_after"], _drive(task, "gradient", steps, opts)))
    print(f"\n(5) informative block selection: gradient per_block, {steps} steps, lr 1e-2, seed 0")
    full_bytes, full_acc = rows[0][2], rows[0][3]
    for label, b, nbytes, acc in rows:
        print(f"  {label:18s} task vectors held {nbytes / 2**20:6.1f} MB ({nbytes / full_bytes:.2f}x); "
              f"test normalised acc {acc:.4f} ({100 * (acc - full_acc):+.2f} points)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(FIGURES), help=f"comma-separated subset of {','.join(FIGURES)}")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the multi-fidelity comparison")
    ap.add_argument("--overhead-evals", type=int, default=60)
    ap.add_argument("--selection-steps", type=int, default=100)
    ap.add_argument("--results-dir", default="results/bench-perf")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    only = [f.strip() for f in a.only.split(",") if f.strip()]
    bad = [f for f in only if f not in FIGURES]
    if bad:
        raise HarnessError(f"unknown perf figure '{bad[0]}'; valid: {', '.join(FIGURES)}")
    t0 = time.time()
    if "throughput" in only:
        throughput(a.repeats)
    if "overhead" in only:
        overhead(max(3, a.repeats // 2), a.overhead_evals, a.results_dir + "/overhead")
    if "fidelity" in only:
        fidelity([int(s) for s in a.seeds.split(",")], a.results_dir + "/fidelity")
    if "memory" in only:
        memory(a.results_dir + "/memory", 30)
    if "selection" in only:
        selection(a.selection_steps, [3, 1])
    print(f"\ntotal {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
