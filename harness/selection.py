"""Informative block selection (aTLAS paper, appendix D.6): hold fewer task vectors.

Before any search, the gradient of the search loss w.r.t. every (task vector, block) coefficient is
measured once at the start point; each block then keeps only the ``b`` task vectors with the
largest |∂L/∂λ| and frees the rest. The coefficient space is unchanged (dropped coefficients have
no effect), so every searcher runs as before on a composition that holds fewer task vectors.

Example:
    >>> task.setup()
    >>> report = select_informative(task, b=2)      # keep 2 of T task vectors per block
    >>> report["bytes_after"] / report["bytes_before"]
"""
from __future__ import annotations

import numpy as np

from harness.api import Candidate, HarnessError
from harness.composition import top_tasks_per_block


def block_scores(task, x: np.ndarray | None = None) -> np.ndarray:
    """|∂L/∂λ_{t,b}| at ``x`` (default: the space's start) on the task's whole search set, (T, B).

    Needs a space with one coefficient per (task, block) or finer: ``per_block`` or
    ``per_partition:K`` (partitions of a block are summed in absolute value).
    """
    comp = task.comp
    if comp.kind not in ("per_block", "per_partition"):
        raise HarnessError(f"block selection needs per-block gradients: use --space per_block or "
                           f"per_partition:K, not {comp.space}")
    x = task.space().start if x is None else np.asarray(x, dtype=np.float64)
    ev = task.evaluate([Candidate(x=x, grad=True)])[0]
    if ev.grad is None or not np.all(np.isfinite(ev.grad)):
        raise HarnessError("block selection: the task returned no finite gradient at the start point")
    g = np.abs(np.asarray(ev.grad, dtype=np.float64)).reshape(comp.T, comp.B, -1)
    return g.sum(-1)


def select_informative(task, b: int, x: np.ndarray | None = None) -> dict:
    """Keep the top-``b`` task vectors per block of ``task.comp`` by |∂L/∂λ| (in place).

    Returns:
        ``{"b", "T", "B", "bytes_before", "bytes_after", "kept": {task name: blocks kept}}``.
    """
    comp = task.comp
    if not 1 <= b <= comp.T:
        raise HarnessError(f"block selection keeps b task vectors per block, 1 <= b <= {comp.T}; got {b}")
    before = comp.memory_bytes()
    keep = top_tasks_per_block(block_scores(task, x), b)
    comp.select(keep)
    kept = {name: sum(t in k for k in keep) for t, name in enumerate(comp.task_names)}
    return {"b": b, "T": comp.T, "B": comp.B, "bytes_before": before, "bytes_after": comp.memory_bytes(), "kept": kept}
