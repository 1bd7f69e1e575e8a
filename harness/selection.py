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
    g = np.abs(np.asarray(ev.grad, dtype=np.float64))
    if comp.kind == "per_block":
        return g.reshape(comp.T, comp.B)
    scores = np.zeros((comp.T, comp.B))  # blocks without coefficients (per_partition:K:matrices) score 0
    scores[:, comp.parted] = g.reshape(comp.T, len(comp.parted), -1).sum(-1)
    return scores


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


SELECT_BY = ("gradient", "features", "random")
FEATURE_IMAGES = 64  # validation images per other data set whose centroid ``features`` compares


def vector_scores(task, by: str) -> np.ndarray:
    """One relevance score per composed task vector (higher: keep first), for :func:`select_vectors`.

    ``gradient``: |∂L/∂α_t| at the start, the derivative of the search loss with respect to one
    coefficient scaling the whole task vector (the sum of its coordinates' derivatives).
    ``features``: cosine similarity, under the pre-trained model, between the centroid of the
    task's search inputs (the target's) and the centroid of a fixed subset of each task vector's
    own data set's validation images. ``random``: a permutation drawn with the run seed."""
    comp, T = task.comp, task.comp.T
    if by == "random":
        return np.random.default_rng([task.seed, 211]).permutation(T).astype(np.float64)
    if comp.kind in ("norms", "lora", "lines"):
        raise HarnessError(f"task-vector selection scores each task vector's coefficients; the {comp.kind} space has none")
    start = task.space().start
    if by == "gradient":
        ev = task.evaluate([Candidate(x=start, grad=True)])[0]
        if ev.grad is None or not np.all(np.isfinite(ev.grad)):
            raise HarnessError("task-vector selection: the task returned no finite gradient at the start point")
        return np.abs(np.asarray(ev.grad, dtype=np.float64)[:comp.dim].reshape(T, -1).sum(1))
    import torch
    import torch.nn.functional as F
    src = task.source
    with torch.no_grad():
        base = task.engine.params(np.zeros(comp.dim), False)[0]
        target = F.normalize(src.features(base, task.search.inputs[0][:256]).mean(0), dim=0)
        scores = []
        for name in comp.task_names:
            x = src.inputs[name]["val"]
            idx = task.pick(len(x), FEATURE_IMAGES, salt=212)
            x = x[idx.to(x.device)] if isinstance(x, torch.Tensor) else x[idx.numpy()]
            centroid = F.normalize(src.features(base, torch.as_tensor(x).to(task.engine.device)).mean(0), dim=0)
            scores.append(float(target @ centroid))
    return np.asarray(scores)


def select_vectors(task, b: int, by: str) -> dict:
    """Compose only the ``b`` most relevant task vectors (whole vectors: the space shrinks to b of
    T rows), scored by :func:`vector_scores`; the paper's task-vector budget (Table 14) beside
    informative *block* selection (:func:`select_informative`). Rebuilds ``task.comp`` and its
    engine on the task's device. Returns ``{"b", "by", "scores", "kept"}``."""
    if by not in SELECT_BY:
        raise HarnessError(f"select_by must be one of {', '.join(SELECT_BY)}, got {by!r}")
    comp = task.comp
    if not 1 <= b <= comp.T:
        raise HarnessError(f"select_vectors keeps b whole task vectors, 1 <= b <= {comp.T}; got {b}")
    scores = vector_scores(task, by)
    order = sorted(range(comp.T), key=lambda t: (-scores[t], t))[:b]
    kept = [comp.task_names[t] for t in sorted(order)]
    device, info = task.engine.device, dict(task.task_info)
    task.compose(kept)
    task.engine.to(device)
    for k, v in info.items():
        task.task_info.setdefault(k, v)
    return {"b": b, "by": by, "scores": {n: round(float(s), 6) for n, s in zip(comp.task_names, scores)}, "kept": kept}
