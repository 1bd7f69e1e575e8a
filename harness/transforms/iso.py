"""Iso-C (Marczak et al. 2025) as a task-vector transform."""
from __future__ import annotations

from dataclasses import dataclass

from harness.api import Transform, option
from harness.transforms.common import flat_spectrum, is_matrix, stack


class IsoC(Transform):
    """Iso-C: for each weight matrix, the sum Σ_i τ_i with its singular values all replaced by their
    mean (U · mean(σ) · Vᵀ), a flat spectrum; the other blocks are combined as ``other`` says
    (``sum``, as task arithmetic does; ``mean``, as FusionBench's ``iso_c`` does). ``conv=matrix``
    treats a weight of more than 2 dimensions (a convolution kernel) as the matrix (out, rest);
    ``conv=other`` combines it like a 1-D block (FusionBench). Returns one vector, ``iso``."""

    name = "iso"
    description = "Iso-C: per weight matrix, the sum of task vectors with a flat singular spectrum"

    @dataclass
    class Options:
        other: str = option("sum", "how the blocks that are not matrices combine: sum (task arithmetic) or mean "
                                   "(FusionBench)", choices=("sum", "mean"))
        conv: str = option("matrix", "weights of more than 2 dimensions: flattened to matrices (out, rest), or "
                                     "combined like the other blocks", choices=("matrix", "other"))

    def apply(self, task_vectors, names, seed):
        o, T = self.options, len(task_vectors)
        out, matrices = {}, 0
        for k in task_vectors[0]:
            total = stack(task_vectors, k).sum(0)
            if is_matrix(total, o.conv):
                out[k] = flat_spectrum(total)
                matrices += 1
            else:
                out[k] = total / T if o.other == "mean" else total
        return [out], ["iso"], {"matrices": matrices, "other_blocks": len(out) - matrices, "merged": T}
