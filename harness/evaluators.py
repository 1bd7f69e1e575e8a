"""Evaluators score batches of candidates on a task: in this process, or on Ray workers.

Every evaluator returns the same :class:`Evaluation` list for the same candidates, so the
runner and the searchers never know where the work happened.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np

from harness.api import Candidate, Evaluation, Task

# Loss given to the searcher for an evaluation that failed (NaN/inf): large enough to be the
# worst, small enough that optimisers that average losses (CMA, Cobyla's models) stay stable.
PENALTY = 1e3


def sanitize(ev: Evaluation) -> Evaluation:
    """Turn a non-finite loss or gradient into a failed evaluation with the penalty loss."""
    bad = not math.isfinite(ev.loss) or (ev.grad is not None and not np.all(np.isfinite(ev.grad)))
    if bad:
        return Evaluation(loss=PENALTY, grad=None, metrics=ev.metrics, weight=ev.weight, ok=False,
                          error=ev.error or "non-finite loss or gradient")
    return ev


def reduce_shards(parts: list[Evaluation]) -> Evaluation:
    """Exact weighted mean of shard losses (and gradients) by their sample counts."""
    total = sum(p.weight for p in parts)
    if any(not p.ok for p in parts):
        bad = next(p for p in parts if not p.ok)
        return Evaluation(loss=PENALTY, weight=total, ok=False, error=bad.error)
    loss = sum(p.loss * p.weight for p in parts) / total
    grad = None
    if all(p.grad is not None for p in parts):
        grad = sum(np.asarray(p.grad, dtype=np.float64) * p.weight for p in parts) / total
    metrics = {}
    for k in parts[0].metrics:
        metrics[k] = sum(p.metrics.get(k, 0.0) * p.weight for p in parts) / total
    return Evaluation(loss=float(loss), grad=grad, metrics=metrics, weight=total)


class Evaluator(ABC):
    """Scores candidates. ``describe()`` says where (for the run record)."""

    @abstractmethod
    def evaluate(self, candidates: list[Candidate]) -> list[Evaluation]: ...

    def close(self) -> None:
        pass

    def describe(self) -> dict:
        return {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LocalEvaluator(Evaluator):
    """Evaluates in this process on a task whose ``setup`` has already run."""

    def __init__(self, task: Task):
        self.task = task

    def evaluate(self, candidates: list[Candidate]) -> list[Evaluation]:
        evs = self.task.evaluate(candidates)
        return [sanitize(self.task.complete(c, e)) for c, e in zip(candidates, evs)]

    def describe(self) -> dict:
        return {"evaluator": "local", "workers": 0}
