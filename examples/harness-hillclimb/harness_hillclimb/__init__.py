"""A coordinate hill climber: the example searcher plugin of the README."""
from dataclasses import dataclass

import numpy as np

from harness.api import Candidate, Searcher


class HillClimb(Searcher):
    """Try ±step on one coordinate at a time; keep what helps, halve the step after a full sweep."""

    name = "hillclimb"
    description = "coordinate hill climbing (example plugin from examples/harness-hillclimb)"
    default_budget = 200
    default_space = "per_task"

    @dataclass
    class Options:
        step: float = 0.5

    def __init__(self, space, budget, batch_size, seed, options):
        super().__init__(space, budget, batch_size, seed, options)
        self.best_x, self.best_loss = space.start.copy(), np.inf
        self.step, self.coord, self.sign, self.improved = options.step, 0, 1.0, False
        self.started = False

    def ask(self, n):
        if not self.started:
            self.started = True
            return [Candidate(x=self.best_x.copy())]
        x = self.best_x.copy()
        x[self.coord] += self.sign * self.step
        return [Candidate(x=self.space.clip(x))]

    def tell(self, candidates, evaluations):
        for c, e in zip(candidates, evaluations):
            if e.ok and e.loss < self.best_loss:
                self.best_x, self.best_loss, self.improved = c.x.copy(), e.loss, True
                continue
            if self.sign > 0:
                self.sign = -1.0  # try the other direction on the same coordinate
                continue
            self.sign, self.coord = 1.0, self.coord + 1
            if self.coord == self.space.dim:
                self.coord = 0
                if not self.improved:
                    self.step /= 2
                self.improved = False

    def recommend(self):
        return self.best_x.copy()
