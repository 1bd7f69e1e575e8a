"""Wall time of dfo-gn against gradient descent in the paper's space, side by side in one process.

Runs, one after another on the embedded default (task addition, raw task vectors, per block), the
gradient reference (300 steps, lr 0.01) and dfo-gn configurations, each into a fresh results
folder, and prints normalised accuracy, wall seconds and the wall time as a multiple of the
gradient run's. Timings on a shared machine vary run to run: compare the ratios of one call.

    python benchmarks/dfo_check.py [--seed 0] [--configs 725:128:100,725:128,544:128,725:64]
"""
from __future__ import annotations

import argparse
import json
import tempfile

import harness


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", default="725:128,544:128,725:64",
                    help="dfo-gn runs as BUDGET:SEARCH_N[:INNER_STEPS] (725 = 4 rounds of 180 probes, 544 = 3)")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [("gradient per_block (300)", dict(searcher="gradient", budget=300, searcher_options={"lr": 0.01}))]
        for spec in args.configs.split(","):
            budget, n, *inner = (int(v) for v in spec.split(":"))
            opts = {"inner_steps": inner[0]} if inner else {}
            label = f"dfo-gn per_block ({budget}), {n} images" + (f", {inner[0]} inner steps" if inner else "")
            runs.append((label, dict(searcher="dfo-gn", budget=budget, task_options={"search_n": n},
                                     searcher_options=opts)))
        for label, kw in runs:
            run = harness.run("addition", space="per_block", seed=args.seed, results_dir=tmp, rerun=True, **kw)
            rows.append({"run": label, "normalized_acc": round(run.score, 4), "wall_s": round(run.wall_time_s, 1),
                         "evaluations": run.evaluations})
            rows[-1]["wall_vs_gradient"] = round(rows[-1]["wall_s"] / rows[0]["wall_s"], 2)
            print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
