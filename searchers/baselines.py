"""The data-free merging baselines the field cites, as task arithmetic over transformed vectors.

Each searcher here is the task-arithmetic α grid with a task-vector transform (``harness.transforms``)
bound to it: the run's task composes the transformed vectors, whose plain sum is the method's
merged vector, so ``α·1`` is the method and α is chosen on the search split exactly as for task
arithmetic. ``-t transform=NAME:key=value,...`` sets the transform's options (the name must be the
searcher's own); without it the transform runs with its defaults. On a task that composes no task
vectors (the quadratic test function) there is nothing to transform and the searcher is its grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harness.api import option
from atlas_harness_searchers.task_arithmetic import TaskArithmeticSearcher


@dataclass
class WideGrid(TaskArithmeticSearcher.Options):
    """The α grid ``linspace(0, 2, 21)``: merges whose scale sits near one task vector's."""

    hi: float = option(2.0, "last α of the grid (at least lo)")


class TiesSearcher(TaskArithmeticSearcher):
    """TIES-Merging (Yadav et al. 2023): θ0 + α · ties(τ_1..τ_T), α on ``linspace(0, 2, 21)``.

    With the default ``merge=mean`` the merged vector has the scale of one task vector, so the
    paper's α ≈ 1 is inside the grid. FusionBench's variant is ``-t transform=ties:merge=sum`` with
    ``-s lo=0.3 -s hi=0.3 -s points=1`` (its fixed scaling factor 0.3)."""

    name = "ties"
    description = "TIES-Merging baseline: α grid over linspace(0, 2, 21) on TIES vectors (trim, elect, disjoint mean)"
    transform = "ties"
    Options = WideGrid


class DareSearcher(TaskArithmeticSearcher):
    """DARE + task arithmetic (Yu et al. 2024): θ0 + α Σ dare(τ_i), α on the task-arithmetic grid
    ``linspace(0, 1, 21)`` (rescaled DARE keeps each task vector's expectation, so the α of task
    arithmetic carries over). Masks are seeded by the run seed."""

    name = "dare"
    description = "DARE baseline: task arithmetic over linspace(0, 1, 21) on drop-and-rescale (p=0.5) vectors"
    transform = "dare"


class IsoSearcher(TaskArithmeticSearcher):
    """Iso-C (Marczak et al. 2025): θ0 + α · iso(Σ τ_i), α on ``linspace(0, 2, 21)`` (the flat
    spectrum shrinks the dominant directions, so the paper's α is above 1). FusionBench's variant
    is ``-t transform=iso:other=mean,conv=other`` with ``-s lo=1 -s hi=1 -s points=1``."""

    name = "iso"
    description = "Iso-C baseline: α grid over linspace(0, 2, 21) on the flat-spectrum sum of the task vectors"
    transform = "iso"
    Options = WideGrid


class IsoCtsSearcher(TaskArithmeticSearcher):
    """Iso-CTS (Marczak et al. 2025): θ0 + α · iso_cts(τ_1..τ_T), α on ``linspace(0, 2, 21)``.
    FusionBench's variant is ``-t transform=iso-cts:conv=other`` with ``-s lo=1 -s hi=1 -s points=1``."""

    name = "iso-cts"
    description = "Iso-CTS baseline: α grid over linspace(0, 2, 21) on the common + task-specific flat-spectrum merge"
    transform = "iso-cts"
    Options = WideGrid


class TsvmSearcher(TaskArithmeticSearcher):
    """TSV-M (Gargiulo et al. 2025): θ0 + α · Σ tsvm(τ_i), α on ``linspace(0, 2, 21)`` (the paper
    and FusionBench use α = 1). FusionBench's variant is ``-t transform=tsvm:conv=other``."""

    name = "tsvm"
    description = "TSV-M baseline: α grid over linspace(0, 2, 21) on decorrelated task singular vectors"
    transform = "tsvm"
    Options = WideGrid


class ConsensusSearcher(TaskArithmeticSearcher):
    """Consensus task arithmetic (Wang et al. 2024): θ0 + α · Σ consensus(τ_i), α on the
    task-arithmetic grid ``linspace(0, 1, 21)`` (the masked sum keeps task arithmetic's scale)."""

    name = "consensus"
    description = "consensus merging baseline: task arithmetic over linspace(0, 1, 21) on TALL-consensus-masked vectors"
    transform = "consensus"


class WudiSearcher(TaskArithmeticSearcher):
    """WUDI (Cheng et al. 2025): θ0 + α · wudi(τ_1..τ_T), α on ``linspace(0, 2, 21)`` (the
    paper and FusionBench use α = 1)."""

    name = "wudi"
    description = "WUDI baseline: α grid over linspace(0, 2, 21) on the data-free WUDI merge"
    transform = "wudi"
    Options = WideGrid


class CartSearcher(TaskArithmeticSearcher):
    """CART (Choi et al. 2024): θ0 + mean(τ) + λ Σ_t LowRank(τ_t − mean(τ)), λ on
    ``linspace(0, 2, 21)`` chosen on the search split: the grid scales the low-rank centred
    vectors while the coefficients of the ``average`` vector the transform puts first stay at 1.
    Over vectors without an ``average`` (no transform) it is the plain α grid."""

    name = "cart"
    description = "CART baseline: the task vectors' average plus λ · low-rank centred vectors, λ over linspace(0, 2, 21)"
    transform = "cart"
    Options = WideGrid

    def __init__(self, space, budget, batch_size, seed, options):
        super().__init__(space, budget, batch_size, seed, options)
        labels = list(getattr(space, "labels", None) or [])
        self.average = np.array([str(lab).split("/")[0].lstrip("_") == "average" for lab in labels], dtype=bool)

    def _x(self, alpha):
        x = np.full(self.space.dim, float(alpha))
        if self.average.shape == x.shape:
            x[self.average] = 1.0
        return self.space.clip(x)

    def _tell(self, candidates, evaluations):
        lam = self.best_x[~self.average][0] if self.average.shape == self.best_x.shape and (~self.average).any() \
            else self.best_x[0]
        self.info = {"lambda": float(lam) if np.isfinite(self.best_loss) else None}
