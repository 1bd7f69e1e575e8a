"""Evaluators score batches of candidates on a task: in this process, or on Ray workers.

Every evaluator returns the same :class:`Evaluation` list for the same candidates, so the
runner and the searchers never know where the work happened.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np

from harness.api import Candidate, Evaluation, Task

# How Ray workers share the work (``--parallel``; see :mod:`harness.ray_evaluator`).
PARALLEL_MODES = ("auto", "candidates", "data", "async")
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
    if not total:  # e.g. no sample passed tta's reliable filter on any shard: a mean over nothing
        return Evaluation(loss=PENALTY, weight=0.0, ok=False, error="every shard weighs 0: the mean is over no sample")
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

    def submit(self, candidates: list[Candidate]) -> None:
        """Queue candidates for :meth:`collect` (pipelined runs). Here they wait for it; the Ray
        evaluator starts them on free workers at once."""
        self._backlog = getattr(self, "_backlog", []) + list(candidates)

    def collect(self) -> list[tuple[Candidate, Evaluation]]:
        """Submitted candidates that are scored, with their evaluations, in the order they finished
        (at least one while any is outstanding). Here: all of them, scored now, in order."""
        todo, self._backlog = getattr(self, "_backlog", []), []
        return list(zip(todo, self.evaluate(todo))) if todo else []

    def close(self) -> None:
        pass

    def describe(self) -> dict:
        return {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def fidelity_shard(fidelity: float) -> tuple[int, int] | None:
    """The part of the search set a candidate of this ``fidelity`` is scored on.

    Fidelity f < 1 is served by the first of k = round(1/f) shards, i.e. the same fixed
    ``1/k`` of every data set's search samples for every candidate: low-fidelity losses of two
    candidates are paired (same images), and the parts are nested (1/4 ⊂ 1/2 ⊂ all), so a
    searcher can compare them with the full-set losses of the same points.
    """
    if not fidelity < 1.0:
        return None
    if fidelity <= 0:
        raise ValueError(f"candidate fidelity must be in (0, 1], got {fidelity}")
    return (0, max(1, round(1.0 / fidelity)))


class LocalEvaluator(Evaluator):
    """Evaluates in this process on a task whose ``setup`` has already run.

    Candidates with ``fidelity < 1`` are scored on a fixed part of the search set (see
    :func:`fidelity_shard`); their ``weight`` is the fraction of the set actually used.
    """

    def __init__(self, task: Task):
        self.task = task

    def evaluate(self, candidates: list[Candidate]) -> list[Evaluation]:
        groups: dict[tuple[int, int] | None, list[int]] = {}
        for i, c in enumerate(candidates):
            groups.setdefault(fidelity_shard(c.fidelity), []).append(i)
        evs: list[Evaluation | None] = [None] * len(candidates)
        for shard, idx in groups.items():
            part = [candidates[i] for i in idx]
            out = self.task.evaluate(part) if shard is None else self.task.evaluate(part, shard=shard)
            for i, e in zip(idx, out):
                evs[i] = e
        return [sanitize(self.task.complete(c, e)) for c, e in zip(candidates, evs)]

    def describe(self) -> dict:
        return {"evaluator": "local", "workers": 0}
