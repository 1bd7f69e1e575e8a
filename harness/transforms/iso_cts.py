"""Iso-CTS (Marczak et al., ICML 2025), isotropic merging in common and task-specific subspaces."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.api import Transform, option
from harness.transforms.common import (as_matrix, combine, conv_option, finite, is_matrix, orthogonal_factor,
                                       other_option, stack, svd)


class IsoCts(Transform):
    """Iso-CTS: per weight matrix, the top ``common`` fraction of the singular directions of the
    sum Σ τ_i (the common subspace) plus, for each task, the top directions of its own vector
    once the common subspace is projected out (an equal number per task, filling the rank); the
    two sets of directions are made orthogonal (polar factor) and every singular value is set to
    the mean of the kept ones, a flat spectrum as in Iso-C. Sizes follow the paper's rule: the
    task-specific part is rounded to a multiple of T and the common part takes the rest.

    Blocks that are not matrices are averaged (``other=mean``, the paper and FusionBench) or
    summed (``other=sum``, as ``iso`` does by default). ``conv`` as for ``iso``. Returns one
    vector, ``iso-cts``.
    """

    name = "iso-cts"
    description = "Iso-CTS: flat-spectrum merge over the common subspace of Σ τ_i and each task's own top directions"

    @dataclass
    class Options:
        common: float = option(0.8, "fraction of each matrix's rank given to the common subspace of the summed "
                                    "task vectors (the paper's 0.8)", ge=0, le=1)
        other: str = other_option()
        conv: str = conv_option("decomposed")

    def apply(self, task_vectors, names, seed):
        o, T = self.options, len(task_vectors)
        out, matrices = {}, 0
        for key in task_vectors[0]:
            t = stack(task_vectors, key)
            if not is_matrix(t[0], o.conv):
                out[key] = combine(t, o.other)
                continue
            mats = [as_matrix(x) for x in t]
            rank = min(mats[0].shape)
            per_task = round((rank - int(rank * o.common)) / T)
            per_task = min(per_task, rank // T)
            common = rank - per_task * T
            u, s, vh = svd(sum(mats), "iso-cts")
            uc = u[:, :common]
            us, ss, vs = [], [], []
            for m in mats:
                ui, si, vi = svd(m - uc @ (uc.T @ m), "iso-cts")
                us.append(ui[:, :per_task]), ss.append(si[:per_task]), vs.append(vi[:per_task])
            u_all = orthogonal_factor(torch.cat(us + [uc], 1), "iso-cts")
            v_all = orthogonal_factor(torch.cat(vs + [vh[:common]], 0), "iso-cts")
            level = torch.cat(ss + [s[:common]]).mean()
            out[key] = finite((level * (u_all @ v_all)).reshape(t[0].shape), "iso-cts")
            matrices += 1
        return [out], ["iso-cts"], {"matrices": matrices, "other_blocks": len(out) - matrices, "merged": T}
