"""TSV-M, Task Singular Vectors merging (Gargiulo et al., CVPR 2025), as a task-vector transform."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.api import Transform, option
from harness.transforms.common import (as_matrix, conv_option, finite, is_matrix, orthogonal_factor, other_option,
                                       stack, svd)


class Tsvm(Transform):
    """TSV-M: per weight matrix, each task keeps its top singular triplets (a fraction of the rank,
    1/T by default, so the T pieces fill the rank), then the left singular vectors of all tasks
    and the right ones are each replaced by the nearest orthogonal set (the polar factor), which
    removes the interference between the tasks' subspaces while keeping every task's singular
    values. Task i's vector is its own share, U⊥_i · diag(s_i) · V⊥_iᵀ, so the vectors sum to the
    method's merge and aTLAS can scale each task's decorrelated share separately.

    Blocks that are not matrices are averaged (``other=mean``, the paper and FusionBench: each
    vector holds τ_i / T) or summed (``other=sum``). ``conv=matrix`` decomposes kernels of more
    than 2 dimensions as (out, rest) matrices; ``conv=other`` combines them like 1-D blocks, as
    FusionBench does (it decomposes 2-D weights only). Each task keeps at least one triplet.
    """

    name = "tsvm"
    description = "TSV-M: each task's top singular vectors per matrix, decorrelated (polar factor), summed"

    @dataclass
    class Options:
        fraction: float = option(0.0, "fraction of each matrix's rank kept per task (0: 1/T, the paper's)", ge=0, le=1)
        other: str = other_option()
        conv: str = conv_option("decomposed")

    def apply(self, task_vectors, names, seed):
        o, T = self.options, len(task_vectors)
        out = [{} for _ in task_vectors]
        matrices, kept = 0, []
        for key in task_vectors[0]:
            t = stack(task_vectors, key)
            if not is_matrix(t[0], o.conv):
                for i in range(T):
                    out[i][key] = t[i] / T if o.other == "mean" else t[i].clone()
                continue
            mats = [as_matrix(x) for x in t]
            rank = min(mats[0].shape)
            k = max(1, int(rank * (o.fraction or 1.0 / T)))
            triplets = [svd(m, "tsvm") for m in mats]
            u = orthogonal_factor(torch.cat([u[:, :k] for u, _, _ in triplets], 1), "tsvm")
            vh = orthogonal_factor(torch.cat([vh[:k] for _, _, vh in triplets], 0), "tsvm")
            for i, (_, s, _) in enumerate(triplets):
                share = (u[:, i * k:(i + 1) * k] * s[:k]) @ vh[i * k:(i + 1) * k]
                out[i][key] = finite(share.reshape(t[0].shape), "tsvm")
            matrices += 1
            kept.append(k)
        return out, list(names), {"matrices": matrices, "rank_kept_per_task": sum(kept) / max(len(kept), 1)}
