"""Random search: the baseline every other searcher should beat."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harness.api import Candidate, Searcher, option


class RandomSearcher(Searcher):
    """Random local search: Gaussian samples around the best point so far.

    The step starts at ``sigma`` × the box width and shrinks linearly to a tenth of that over the
    budget; ``mode=uniform`` samples the whole box instead (pure random search).
    """

    name = "random"
    description = "random search: Gaussian samples around the best point so far (or uniform in the box)"
    default_budget = 200
    default_batch = 1
    asynchronous = True  # each sample only needs the best point so far
    default_space = "per_task"

    @dataclass
    class Options:
        mode: str = option("local", "local: Gaussian steps around the best point so far; uniform: anywhere in the box",
                           choices=("local", "uniform"))
        sigma: float = option(0.2, "first step's standard deviation as a fraction of the box width "
                                   "(shrinks linearly to a tenth of it over the budget; mode=local)", gt=0)

    def __init__(self, space, budget, batch_size, seed, options):
        super().__init__(space, budget, batch_size, seed, options)
        self.rng = np.random.default_rng(seed)
        self.asked = 0
        self.started = False

    def _ask(self, n):
        out = []
        for _ in range(n):
            if not self.started:
                x = self.space.start.copy()  # the start (λ = 0, the pre-trained model) is always scored
                self.started = True
            elif self.options.mode == "uniform":
                x = self.rng.uniform(self.space.lower, self.space.upper)
            else:
                frac = min(1.0, self.asked / max(1, self.budget))
                scale = self.options.sigma * (1.0 - 0.9 * frac) * (self.space.upper - self.space.lower)
                x = self.space.clip(self.best_x + scale * self.rng.standard_normal(self.space.dim))
            self.asked += 1
            out.append(Candidate(x=x))
        return out
