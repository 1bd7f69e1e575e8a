"""A random searcher that asks one candidate more than the batch size it was given: the example
of a plugin the conformance suite rejects."""
import numpy as np

from harness.api import Candidate, Searcher


class BrokenBatch(Searcher):
    """Uniform random search that ignores the batch size (deliberately broken)."""

    name = "broken-batch"
    description = "deliberately broken example plugin: ignores the batch size"
    default_space = "per_task"

    def __init__(self, space, budget, batch_size, seed, options):
        super().__init__(space, budget, batch_size, seed, options)
        self.rng = np.random.default_rng(seed)

    def _ask(self, n):
        return [Candidate(x=self.rng.uniform(self.space.lower, self.space.upper)) for _ in range(n + 1)]
