"""The zero-shot reference: λ = 0, the pre-trained model itself."""
from __future__ import annotations

from harness.api import Candidate, Searcher


class ZeroShotSearcher(Searcher):
    """Scores the start of the space once (λ = 0) and recommends it."""

    name = "zero-shot"
    description = "reference: the pre-trained model (all coefficients 0)"
    default_budget = 1
    default_space = "per_task"
    reference = True
    uses_scores = False

    def _ask(self, n):
        return [] if getattr(self, "_done", False) else [Candidate(x=self.space.start.copy())]

    def _tell(self, candidates, evaluations):
        self._done = True

    def _recommend(self):
        return self.space.start.copy()
