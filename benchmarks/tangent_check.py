"""Linearised models: evaluations per second on the direct linearised path (one JVP per candidate)
against the tangent engine (one JVP per coefficient, once; then a matrix product per candidate),
beside the standard model, on the embedded default's addition task, in one process.

    python benchmarks/tangent_check.py [--spaces per_task,per_layer,per_block] [--candidates 20]

For each space it builds the task three ways (standard local engine, linearised local, linearised
tangent), scores the same random candidates, checks that both linearised paths give the same
losses, and prints set-up seconds, evaluations/s and the break-even number of evaluations.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from harness.api import Candidate
from harness.config import resolve_options
from harness.registry import load


def build(space: str, engine: str, linearize: bool, search_n: int):
    cls = load("task", "addition")
    opts = resolve_options(cls, {"engine": engine, "linearize": linearize, "search_n": search_n}, "task")
    cls.validate(opts)
    task = cls(opts, space=space, seed=0)
    task.setup("cpu")
    return task


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spaces", default="per_task,per_layer,per_block")
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--search-n", type=int, default=64, help="validation images per data set in the search set")
    args = ap.parse_args(argv)
    rows = []
    for space in args.spaces.split(","):
        out = {"space": space}
        losses = {}
        for label, engine, lin in (("standard", "local", False), ("linearised", "local", True), ("tangent", "tangent", True)):
            task = build(space, engine, lin, args.search_n)
            rng = np.random.default_rng(0)
            cands = [Candidate(x=rng.uniform(0, 0.6, task.space().dim)) for _ in range(args.candidates)]
            t0 = time.perf_counter()
            first = task.evaluate(cands[:1])
            t1 = time.perf_counter()
            rest = task.evaluate(cands[1:])
            t2 = time.perf_counter()
            losses[label] = [e.loss for e in first + rest]
            out[f"{label}_first_s"] = round(t1 - t0, 3)
            out[f"{label}_evals_per_s"] = round((len(cands) - 1) / (t2 - t1), 2)
            out["dim"] = task.space().dim
        gap = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses["tangent"], losses["linearised"]))
        out["tangent_vs_direct_max_rel_gap"] = float(f"{gap:.2g}")
        per_direct = 1 / out["linearised_evals_per_s"]
        per_tangent = 1 / out["tangent_evals_per_s"]
        setup = out["tangent_first_s"] - per_tangent
        out["break_even_evaluations"] = int(np.ceil(setup / max(per_direct - per_tangent, 1e-9)))
        rows.append(out)
        print(json.dumps(out), flush=True)
    return rows


if __name__ == "__main__":
    main()
