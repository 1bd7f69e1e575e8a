"""CART, centred task vectors with low rank (Choi et al. 2024), as a task-vector transform."""
from __future__ import annotations

from dataclasses import dataclass

from harness.api import Transform, option
from harness.transforms.common import as_matrix, finite, is_matrix, stack, svd


class Cart(Transform):
    """CART: the merge is the average of the task vectors plus the sum of each task's centred
    vector τ_t − mean(τ) cut to its top singular directions (``rank``, a fraction of each
    matrix's rank): θ0 + mean(τ) + λ Σ_t LowRank(τ_t − mean(τ)), i.e. weight averaging corrected
    by the task-specific directions it loses.

    Returns T + 1 vectors: ``average`` (mean(τ)) first, then each task's low-rank centred vector
    under the task's name, so the plain sum is CART with λ = 1, the ``cart`` baseline searches
    λ with the average held at 1, and aTLAS learns a coefficient for the average and for every
    task's centred part. Blocks that are not matrices keep their full centred vectors (their sum
    over tasks is 0, so with one λ they merge to the average, as in the paper). ``conv`` as for
    ``iso``.
    """

    name = "cart"
    description = "CART: the average of the task vectors plus low-rank centred task vectors (Choi et al. 2024)"

    @dataclass
    class Options:
        rank: float = option(0.08, "fraction of each matrix's rank kept of every centred task vector", gt=0, le=1)
        conv: str = option("matrix", "weights of more than 2 dimensions: cut as (out, rest) matrices, or kept in "
                                     "full like the other blocks", choices=("matrix", "other"))

    def apply(self, task_vectors, names, seed):
        o, T = self.options, len(task_vectors)
        average, out, matrices = {}, [{} for _ in task_vectors], 0
        for key in task_vectors[0]:
            t = stack(task_vectors, key)
            mean = t.mean(0)
            average[key] = mean
            centred = t - mean
            if not is_matrix(mean, o.conv):
                for i in range(T):
                    out[i][key] = centred[i].clone()
                continue
            for i in range(T):
                m = as_matrix(centred[i])
                k = max(1, round(min(m.shape) * o.rank))
                u, s, vh = svd(m, "cart")
                out[i][key] = finite(((u[:, :k] * s[:k]) @ vh[:k]).reshape(mean.shape), "cart")
            matrices += 1
        label = "average"
        while label in names:
            label = "_" + label
        return [average] + out, [label] + list(names), {"matrices": matrices, "average": label}
