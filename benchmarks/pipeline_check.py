"""Pipelined against batch-synchronous Ray runs, side by side in one run.

The same nevergrad run (addition on the default effnet zoo, per_block, NGOpt) on two Ray workers,
once with ``--parallel candidates`` (ask a batch, score it, tell it, repeat: a worker that finishes
early waits for the batch's last candidate and for the driver's bookkeeping) and once with
``--parallel async`` (each score is told when it comes in and the freed worker takes the next
candidate at once). Printed: wall time of the search, evaluations per second, the workers'
utilisation (seconds the workers spent computing ÷ (seconds of the search loop × workers), from the
run record's ``evaluator.stats``) and the test
accuracy each reached. Batch 3 on 2 workers is the case batching handles worst (every batch has a
second round with one worker idle); one worker with batch 2 shows the overlap alone (pipelined, the
worker scores the next candidate while the driver tells the last one).

    python benchmarks/pipeline_check.py                 # ~6 min on 2 cores (4 runs of 150 evaluations)
    python benchmarks/pipeline_check.py --budget 12 --configs 2x3   # CI-sized
"""
from __future__ import annotations

import argparse
import tempfile

from harness.config import RunConfig
from harness.runner import run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=150)
    ap.add_argument("--configs", default="1x2,2x3",
                    help="WORKERSxBATCH pairs, comma-separated (batch = candidates in flight when pipelined)")
    ap.add_argument("--space", default="per_block")
    ap.add_argument("--task-options", default="", help="extra task options, key=value;key=value")
    args = ap.parse_args(argv)
    extra = dict(kv.split("=", 1) for kv in args.task_options.split(";") if kv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for workers, batch in [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]:
            for mode in ("candidates", "async"):
                cfg = RunConfig(task="addition", searcher="nevergrad", budget=args.budget, batch_size=batch, seed=0,
                                space=args.space, task_options=extra, workers=workers, parallel=mode,
                                results_dir=f"{tmp}/{mode}-{workers}-{batch}", quiet=True)
                rec = run(cfg, log=lambda m: None)
                st = rec["evaluator"]["stats"]
                rows.append((f"{workers}x{batch}", mode, st["search_s"], rec["evaluations"] / st["search_s"], st["utilisation"],
                             rec["final"].get("normalized_acc", float("nan"))))
    print(f"{'workers x batch':>15} {'mode':<11} {'search s':>9} {'evals/s':>8} {'utilisation':>11} {'norm. acc':>9}")
    for conf, mode, wall, eps, util, acc in rows:
        print(f"{conf:>15} {mode:<11} {wall:>9.1f} {eps:>8.3f} {util:>11.2f} {acc:>9.4f}")
    for conf in dict.fromkeys(r[0] for r in rows):
        sync, pipe = (next(r for r in rows if r[0] == conf and r[1] == m) for m in ("candidates", "async"))
        print(f"{conf}: async ÷ candidates = {pipe[3] / sync[3]:.2f}× evals/s")
    print("measured on this machine's CPUs (Ray workers of 1 CPU each); GPU actors are unmeasured")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
