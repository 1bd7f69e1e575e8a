"""Benchmark suites: several searchers on one task with the same seeds, side by side.

Every run goes through the normal runner, so it is recorded (and skipped when already complete:
an interrupted benchmark resumes). The printed table is the leaderboard of the suite's results
directory plus the gap of each searcher to task arithmetic, per seed.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pandas as pd

from harness.api import HarnessError
from harness.config import RunConfig
from harness.runner import run
from harness.sweeps import read_sweep_file


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_suite(name: str) -> dict:
    """The suite ``benchmarks/bench-NAME.toml`` (a sweep file: one task, labelled searchers)."""
    path = BENCHMARKS / f"bench-{name}.toml"
    if not path.is_file():
        have = sorted(p.stem[len("bench-"):] for p in BENCHMARKS.glob("bench-*.toml")) if BENCHMARKS.is_dir() else []
        raise HarnessError(f"unknown benchmark '{name}'; valid: {', '.join(have + ['perf'])} "
                           f"(suites are the files benchmarks/bench-NAME.toml of the project's source tree)")
    spec = read_sweep_file(str(path))
    if len(spec.get("tasks", [])) != 1:
        raise HarnessError(f"{path} must name exactly one task")
    return spec


def run_suite(name: str, seeds: list[int], results_dir: str, cache_dir: str | None = None,
              task_options: dict | None = None, quiet: bool = True) -> pd.DataFrame:
    """Run (or resume) every entry of a suite for every seed; return one row per run."""
    spec = load_suite(name)
    task = spec["tasks"][0]
    rows = []
    for seed in seeds:
        for e in spec["searchers"]:
            cfg = RunConfig(task=task, searcher=e["name"], space=e.get("space"), budget=e.get("budget"), seed=seed,
                            searcher_options=dict(e.get("options") or {}),
                            task_options={**spec.get("task_options", {}), **(e.get("task_options") or {}),
                                          **(task_options or {})},
                            results_dir=results_dir, cache_dir=cache_dir, quiet=quiet)
            t0 = time.time()
            rec = run(cfg, log=lambda m: print(m, file=sys.stderr))
            head = rec["headline"]
            label = e.get("label") or e["name"]
            print(f"[bench {name}] seed {seed} {label}: {head}={rec['final'][head]:.4f} "
                  f"({rec['evaluations']} evals, {rec['wall_time_s']:.0f} s, {time.time() - t0:.0f} s here)",
                  file=sys.stderr, flush=True)
            rows.append({"label": label, "seed": seed, "value": rec["final"][head],
                         "constraint_ok": rec.get("constraint_ok", True), "evaluations": rec["evaluations"],
                         "wall_time_s": rec["wall_time_s"], **{f"final/{k}": v for k, v in rec["final"].items()}})
    return pd.DataFrame(rows)


def summarize(df: pd.DataFrame, reference: str = "task arithmetic", higher_is_better: bool = True) -> pd.DataFrame:
    """Mean ± std over seeds per entry, and the mean per-seed gap to ``reference`` (in points)."""
    ref = df[df["label"] == reference].set_index("seed")["value"]
    out = []
    for label, g in df.groupby("label", sort=False):
        gap = (g.set_index("seed")["value"] - ref).dropna() * 100
        out.append({
            "searcher": label, "mean": g["value"].mean(), "std": g["value"].std(ddof=1) if len(g) > 1 else math.nan,
            "n": len(g), f"Δ vs {reference} (points)": f"{gap.mean():+.1f} ± {gap.std(ddof=1) if len(gap) > 1 else 0:.1f}",
            "constraint met": f"{int(g['constraint_ok'].sum())}/{len(g)}",
            "evals": int(g["evaluations"].mean()), "wall s": round(g["wall_time_s"].mean(), 1),
        })
    return pd.DataFrame(out)


def main(name: str, seeds: list[int], results_dir: str, cache_dir: str | None, task_options: dict | None) -> str:
    from harness.leaderboards import markdown
    task = load_suite(name)["tasks"][0]
    t0 = time.time()
    df = run_suite(name, seeds, results_dir, cache_dir, task_options)
    table = summarize(df)
    table["mean"] = table.apply(lambda r: f"{r['mean']:.4f}" + ("" if math.isnan(r["std"]) else f" ± {r['std']:.4f}"), axis=1)
    table = table.drop(columns=["std"]).rename(columns={"mean": task + " headline"})
    text = markdown(table)
    per_ds = [c for c in df.columns if c.startswith("final/")]
    detail = df.groupby("label", sort=False)[per_ds].mean().reset_index()
    detail.columns = [c.replace("final/", "") for c in detail.columns]
    text += "\n\nMean over seeds of every reported metric:\n\n" + markdown(detail.round(4))
    text += f"\n\nseeds {seeds}; total wall time {time.time() - t0:.0f} s\n"
    return text
