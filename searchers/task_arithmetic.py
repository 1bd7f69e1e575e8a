"""Task arithmetic: the isotropic baseline θ0 + α Σ τ_i, α chosen on the search split."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harness.api import Candidate, Evaluation, HarnessError, Searcher, option


class TaskArithmeticSearcher(Searcher):
    """Scores α·(1, …, 1) for α on ``linspace(lo, hi, points)`` and keeps the best.

    In every composition space the all-ones vector means "every task vector at full strength", so
    α·1 is plain task arithmetic whatever the granularity. The default grid is the paper's
    ``linspace(0, 1, 21)``; the budget is the grid size.
    """

    name = "task-arithmetic"
    description = "task arithmetic: one isotropic α over linspace(0, 1, 21), chosen on the search split"
    default_budget = 21
    default_batch = 21
    default_space = "per_task"
    reference = True

    @dataclass
    class Options:
        lo: float = option(0.0, "first α of the grid")
        hi: float = option(1.0, "last α of the grid (at least lo)")
        points: int = option(21, "α values on linspace(lo, hi, points), each scored once (the budget)", ge=1)

    @classmethod
    def budget_for(cls, options) -> int:
        return options.points  # the whole grid

    @classmethod
    def validate(cls, options):
        if options.hi < options.lo:
            raise HarnessError(f"searcher option hi must be >= lo ({options.lo}), got {options.hi}")

    def __init__(self, space, budget, batch_size, seed, options):
        super().__init__(space, budget, batch_size, seed, options)
        self.grid = list(np.linspace(options.lo, options.hi, options.points))
        self.next = 0

    def _x(self, alpha):
        return self.space.clip(np.full(self.space.dim, float(alpha)))

    def _ask(self, n):
        alphas = self.grid[self.next:self.next + n]
        self.next += len(alphas)
        return [Candidate(x=self._x(a)) for a in alphas]

    def _tell(self, candidates: list[Candidate], evaluations: list[Evaluation]):
        self.info = {"alpha": float(self.best_x[0]) if np.isfinite(self.best_loss) else None}

    def _recommend(self):
        return self.best_x.copy() if np.isfinite(self.best_loss) else self._x(0.0)
