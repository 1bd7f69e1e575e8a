"""Consensus merging with TALL masks (Wang et al., ICML 2024) as a task-vector transform."""
from __future__ import annotations

from dataclasses import dataclass

from harness.api import Transform, option
from harness.transforms.common import stack


class Consensus(Transform):
    """Consensus merging: task t's TALL mask holds the entries where its own vector matters more
    than the rest of the sum, |τ_t| > λ·|Σ_i τ_i − τ_t| (strict, as in the paper's code); an entry
    is kept in every vector when at least ``k`` masks hold it, and zeroed in all of them
    otherwise. ``k=2`` removes the weights no task or a single task relies on ("catastrophic" and
    "selfish" weights), ``k=0`` keeps everything (task arithmetic). The paper picks λ per task
    from {0.2, …, 0.6} on validation data; here one λ serves every task (0.6, FusionBench's
    default), and every block, 1-D included, is masked.
    """

    name = "consensus"
    description = "consensus merging: keep the entries at least k tasks' TALL masks select (Wang et al. 2024)"

    @dataclass
    class Options:
        lam: float = option(0.6, "TALL mask threshold λ: entry of task t when |τ_t| > λ·|Σ τ − τ_t|", ge=0)
        k: int = option(2, "keep an entry when at least k tasks' masks select it (0 keeps all)", ge=0)

    def apply(self, task_vectors, names, seed):
        o = self.options
        out = [{} for _ in task_vectors]
        kept = total = 0
        for key in task_vectors[0]:
            t = stack(task_vectors, key)
            masks = t.abs() > o.lam * (t.sum(0, keepdim=True) - t).abs()
            keep = masks.sum(0) >= o.k
            kept += int(keep.sum())
            total += keep.numel()
            for i in range(len(out)):
                out[i][key] = t[i] * keep
        return out, list(names), {"kept_fraction": kept / max(total, 1)}
