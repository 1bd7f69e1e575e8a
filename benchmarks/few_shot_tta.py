"""Benchmark: few-shot adaptation and test-time adaptation on the embedded zoo (aTLAS §4.2–4.3).

Few-shot: k ∈ {1, 2, 4, 8, 16} shots per class × 3 seeds (the seed changes the shots) on each
target, the gradient searcher (paper: lr 0.1, cosine) and nevergrad NGOpt against zero-shot.
TTA: each unsupervised objective on each target's unlabelled test split, gradient (paper: lr 1e-3,
cosine) and nevergrad, against zero-shot. Every run goes through
``harness.runner.run`` and is recorded under ``--results-dir``; a finished run is not repeated
(``--rerun`` forces it). Prints Markdown tables of test accuracy (%), mean ± std over seeds.

    python benchmarks/few_shot_tta.py                      # effnet, about 12 min
    python benchmarks/few_shot_tta.py --quick              # 1 seed, k ∈ {1, 4, 16}, smaller budgets
"""
from __future__ import annotations

import argparse
import functools
import sys
import time

import numpy as np
import pandas as pd
import torch

import harness.sources.cache as zoo_cache
from harness.config import RunConfig
from harness.runner import run
from harness.objective import _pairs

GRADIENT_FS = {"lr": 0.1, "schedule": "cosine", "validate_every": 20}
# The paper's TTA learning rate (1e-3, cosine) for every objective: at 1e-2 entropy and UFM collapse
# on cvdigits (−15 and −35 points after 60 steps), see tasks/tta.py.
GRADIENT_TTA = {"lr": 1e-3, "schedule": "cosine", "validate_every": 20}


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", default="effnet")
    p.add_argument("--zoo-options", default="")
    p.add_argument("--targets", default="animals,cvdigits")
    p.add_argument("--shots", default="1,2,4,8,16")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--fs-gradient-budget", type=int, default=100)
    p.add_argument("--fs-nevergrad-budget", type=int, default=150)
    p.add_argument("--fs-nevergrad-space", default="per_layer",
                   help="NGOpt's space (per_block = 150 coefficients needs ~500 evaluations)")
    p.add_argument("--tta-objectives", default="im,ufm,entropy,simclr")
    p.add_argument("--tta-seeds", default="0")
    p.add_argument("--tta-max-n", type=int, default=500)
    p.add_argument("--tta-gradient-budget", type=int, default=60)
    p.add_argument("--tta-nevergrad-objectives", default="im,entropy",
                   help="objectives also run with nevergrad (ufm and simclr add 128 s and lose 10-24 points)")
    p.add_argument("--tta-nevergrad-budget", type=int, default=80)
    p.add_argument("--space", default="per_block", help="the gradient searcher's space (the paper's)")
    p.add_argument("--results-dir", default="results/bench-few-shot")
    p.add_argument("--cache-dir", default=None)
    # One thread: the evaluations here are small (10–500 images), and with 2 threads on 2 busy cores
    # a tiny-clip gradient step was measured 40x slower (0.83 s vs 0.02 s) than with one.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rerun", action="store_true")
    p.add_argument("--quick", action="store_true", help="1 seed, k ∈ {1, 4, 16}, halved budgets")
    p.add_argument("--skip-tta", action="store_true")
    p.add_argument("--skip-few-shot", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.shots, a.tta_seeds = "0", "1,4,16", "0"
        a.fs_gradient_budget //= 2
        a.fs_nevergrad_budget //= 2
        a.tta_gradient_budget //= 2
        a.tta_nevergrad_budget //= 2
    return a


def _ints(s):
    return [int(v) for v in s.split(",") if v.strip()]


def _names(s):
    return [v.strip() for v in s.split(",") if v.strip()]


def _cell(values) -> str:
    v = 100 * np.asarray(values, dtype=float)
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v.mean():.1f}"


def _markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


class Bench:
    """Runs one config through the runner and keeps the numbers the tables need."""

    def __init__(self, a):
        self.a, self.rows = a, []

    def __call__(self, section: str, task: str, searcher: str, seed: int, budget: int, space: str,
                 task_options: dict, searcher_options: dict, **keys) -> dict:
        a = self.a
        cfg = RunConfig(task=task, searcher=searcher, budget=budget, seed=seed, space=space,
                        task_options={"source": a.zoo, "source_options": a.zoo_options, **task_options},
                        searcher_options=searcher_options, results_dir=a.results_dir,
                        cache_dir=a.cache_dir, quiet=True, rerun=a.rerun)
        t0 = time.time()
        rec = run(cfg, log=lambda m: None)
        if rec.get("status") != "complete":
            raise SystemExit(f"run {rec.get('run_id')} ended {rec.get('status')}: {rec.get('error')}")
        row = {"section": section, "searcher": searcher, "seed": seed, **keys,
               "acc": rec["final"]["acc"], "zero_shot": rec["final"]["zero_shot_acc"],
               "run_wall_s": rec["wall_time_s"], "this_wall_s": time.time() - t0,
               "chosen": (rec.get("searcher_info") or {}).get("chosen", "")}
        self.rows.append(row)
        print(f"  {section} {keys} {searcher} seed {seed}: acc {row['acc']:.3f} "
              f"(zero-shot {row['zero_shot']:.3f}) in {row['run_wall_s']:.1f} s", file=sys.stderr, flush=True)
        return row


def few_shot(a, bench: Bench):
    for target in _names(a.targets):
        for k in _ints(a.shots):
            for seed in _ints(a.seeds):
                opts = {"target": target, "shots": k}
                bench("few_shot", "few_shot", "gradient", seed, a.fs_gradient_budget, a.space, opts, GRADIENT_FS,
                      target=target, k=k)
                bench("few_shot", "few_shot", "nevergrad", seed, a.fs_nevergrad_budget, a.fs_nevergrad_space, opts,
                      {}, target=target, k=k)


def tta(a, bench: Bench):
    for target in _names(a.targets):
        for objective in _names(a.tta_objectives):
            for seed in _ints(a.tta_seeds):
                opts = {"target": target, "objective": objective, "max_n": a.tta_max_n}
                bench("tta", "tta", "gradient", seed, a.tta_gradient_budget, a.space, opts,
                      GRADIENT_TTA, target=target, objective=objective)
                if objective in _names(a.tta_nevergrad_objectives):
                    bench("tta", "tta", "nevergrad", seed, a.tta_nevergrad_budget, a.fs_nevergrad_space, opts, {},
                          target=target, objective=objective)


def table(df: pd.DataFrame, keys: list[str]) -> tuple[str, dict]:
    """One row per key, zero-shot and each searcher as mean ± std over seeds; and mean gains."""
    out, gains = [], {}
    df = df.dropna(axis=1, how="all").astype({k: int for k in keys if k == "k"})
    for key, g in df.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        zs = g[g.searcher == g.searcher.iloc[0]].sort_values("seed").zero_shot
        row = dict(zip(keys, key))
        row["zero-shot"] = _cell(zs)
        for s, gs in g.groupby("searcher", sort=False):
            gs = gs.sort_values("seed")
            row[s] = _cell(gs.acc)
            row[f"{s} − zero-shot"] = f"{100 * (gs.acc.values - gs.zero_shot.values).mean():+.1f}"
            gains.setdefault(s, []).extend(gs.acc.values - gs.zero_shot.values)
        out.append(row)
    return _markdown(pd.DataFrame(out).fillna("")), gains


def main(argv=None) -> int:
    a = _args(argv)
    torch.set_num_threads(a.threads)
    # Every run in this process reads the same zoo: load it from disk once (tasks never modify it).
    zoo_cache.build_zoo = functools.lru_cache(maxsize=4)(zoo_cache.build_zoo)
    t0 = time.time()
    src = zoo_cache.get_zoo(a.zoo, cache_dir=a.cache_dir, progress=True, **_pairs(a.zoo_options, "--zoo-options"))
    print(f"zoo {a.zoo} ready in {time.time() - t0:.1f} s: {src}", file=sys.stderr)
    bench = Bench(a)
    walls = {}
    if not a.skip_few_shot:
        t = time.time()
        few_shot(a, bench)
        walls["few-shot"] = time.time() - t
    if not a.skip_tta:
        t = time.time()
        tta(a, bench)
        walls["tta"] = time.time() - t
    df = pd.DataFrame(bench.rows)
    print(f"# aTLAS few-shot and test-time adaptation on zoo `{a.zoo}` (test accuracy %, mean ± std over seeds)\n")
    if not a.skip_few_shot:
        fs = df[df.section == "few_shot"]
        md, gains = table(fs, ["target", "k"])
        print(f"## Few-shot: {len(_ints(a.seeds))} seeds; gradient {a.fs_gradient_budget} evaluations ({a.space}, "
              f"lr 0.1 cosine), nevergrad NGOpt {a.fs_nevergrad_budget} evaluations ({a.fs_nevergrad_space})\n")
        print(md + "\n")
        for s, g in gains.items():
            print(f"- {s}: mean gain over zero-shot {100 * np.mean(g):+.2f} points over {len(g)} runs "
                  f"(better in {int(np.sum(np.asarray(g) > 0))}, worse in {int(np.sum(np.asarray(g) < 0))})")
        print(f"- wall time: {walls['few-shot']:.0f} s for {len(fs)} runs\n")
    if not a.skip_tta:
        tt = df[df.section == "tta"]
        md, gains = table(tt, ["target", "objective"])
        print(f"## Test-time adaptation: {len(_ints(a.tta_seeds))} seed(s), {a.tta_max_n} test images per target; "
              f"gradient {a.tta_gradient_budget} evaluations ({a.space}), nevergrad {a.tta_nevergrad_budget} "
              f"({a.fs_nevergrad_space})\n")
        print(md + "\n")
        for s, g in gains.items():
            print(f"- {s}: mean gain over zero-shot {100 * np.mean(g):+.2f} points over {len(g)} runs")
        for (s, obj), g in tt.groupby(["searcher", "objective"], sort=False):
            print(f"- {s}, {obj}: mean gain {100 * (g.acc - g.zero_shot).mean():+.2f} points over {len(g)} runs")
        print(f"- wall time: {walls['tta']:.0f} s for {len(tt)} runs\n")
    print(f"total wall time {time.time() - t0:.0f} s ({a.threads} threads); runs recorded in {a.results_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
