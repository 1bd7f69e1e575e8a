"""A coordinate hill climber: the example searcher plugin of the README."""
from dataclasses import dataclass

from harness.api import Candidate, Searcher


class HillClimb(Searcher):
    """Try ±step on one coordinate at a time; keep what helps, halve the step after a full sweep."""

    name = "hillclimb"
    description = "coordinate hill climbing (example plugin from examples/harness-hillclimb)"
    default_budget = 200
    default_space = "per_task"

    @dataclass
    class Options:          # -s step=0.25 is parsed against these typed fields
        step: float = 0.5

    def __init__(self, space, budget, batch_size, seed, options):
        super().__init__(space, budget, batch_size, seed, options)   # validates options once
        self.step, self.coord, self.sign, self.started = options.step, 0, 1.0, False
        self.improved = False

    def _ask(self, n):
        self.before = self.best_loss                       # the base keeps best_x / best_loss
        if not self.started:
            self.started = True
            return [Candidate(x=self.best_x.copy())]
        x = self.best_x.copy()
        x[self.coord] += self.sign * self.step
        return [Candidate(x=self.space.clip(x))]

    def _tell(self, candidates, evaluations):
        # Called after the base has updated best_x/best_loss with these scores (one per ask).
        if self.best_loss < self.before:
            self.improved = True
            return
        for _ in candidates:
            if self.sign > 0:
                self.sign = -1.0
                continue
            self.sign, self.coord = 1.0, self.coord + 1
            if self.coord == self.space.dim:
                self.coord = 0
                if not self.improved:
                    self.step /= 2
                self.improved = False
    # recommend(): the base returns the best point scored on the whole search set.
