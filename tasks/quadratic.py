"""A synthetic task with a known optimum: an example of the task protocol and a test fixture."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from harness.api import Candidate, Evaluation, Outputs, Space, Task, option


# Coefficient vectors are held in float64 by every searcher: 10 million of them is 80 MB each,
# well within a machine; 3e9 would ask for tens of gigabytes per candidate.
MAX_DIM = 10_000_000


class QuadraticTask(Task):
    """loss(x) = mean_i w_i (x_i − x*_i)², x* drawn in [−1, 1] from the seed, weights in [0.5, 2].

    ``noise`` adds Gaussian noise to mini-batch evaluations (``Candidate.batch``), so the gradient
    searcher sees a stochastic objective as it does on real tasks. The headline ``distance`` is
    ‖x − x*‖ / √dim (lower is better).
    """

    name = "quadratic"
    description = "synthetic quadratic with a known optimum (example task and test fixture)"
    headline = "distance"
    higher_is_better = False

    @dataclass
    class Options:
        dim: int = option(8, "number of coefficients", ge=1, le=MAX_DIM)
        noise: float = option(0.0, "standard deviation of Gaussian noise added to mini-batch losses (0: none)", ge=0)
        # Test fixtures: one to kill a run mid-search, one to exercise failed evaluations.
        delay: float = option(0.0, "test fixture: seconds slept per evaluation", ge=0)
        nan_above: float | None = option(None, "test fixture: the loss is NaN where x[0] > nan_above (None: never)")

    @classmethod
    def returns_outputs(cls, options) -> bool:
        return True  # the residuals √w_i·(x_i − x*_i): the loss is their mean square

    def setup(self, device="cpu"):
        rng = np.random.default_rng([self.seed, 7])
        self.optimum = rng.uniform(-1.0, 1.0, self.options.dim)
        self.weights = rng.uniform(0.5, 2.0, self.options.dim)

    def space(self):
        return Space(dim=self.options.dim, lower=-1.5, upper=1.5, kind="flat",
                     labels=[f"x{i}" for i in range(self.options.dim)])

    def _loss_grad(self, x, idx):
        d = x[idx] - self.optimum[idx]
        return float(np.mean(self.weights[idx] * d * d)), idx, 2.0 * self.weights[idx] * d / len(idx)

    def evaluate(self, candidates: list[Candidate], shard=None):
        dim = self.options.dim
        # The "data" of this task are its coordinates: a shard scores a disjoint subset of them.
        idx = np.arange(dim) if shard is None else np.array_split(np.arange(dim), shard[1])[shard[0]]
        out = []
        for c in candidates:
            x = np.asarray(c.x, dtype=np.float64)
            if len(idx) == 0:
                out.append(Evaluation(loss=0.0, grad=np.zeros(dim) if c.grad else None, weight=0.0))
                continue
            if self.options.delay:
                time.sleep(self.options.delay)
            loss, sel, g = self._loss_grad(x, idx)
            if self.options.nan_above is not None and x[0] > self.options.nan_above:
                loss = float("nan")
            if c.batch is not None and self.options.noise > 0:
                loss += float(np.random.default_rng([self.seed, c.batch]).normal(0.0, self.options.noise))
            grad = None
            if c.grad:
                grad = np.zeros(dim)
                grad[sel] = g
            out.append(Evaluation(loss=loss, grad=grad, weight=float(len(idx))))
            if c.outputs and shard is None and c.batch is None:
                r = np.sqrt(self.weights) * (x - self.optimum)
                out[-1].outputs = Outputs(logits=[r[:, None]], labels=[None], weights=[np.ones(dim)])
        return out

    def final(self, x):
        x = np.asarray(x, dtype=np.float64)
        return {"distance": float(np.linalg.norm(x - self.optimum) / np.sqrt(self.options.dim)),
                "loss": self._loss_grad(x, np.arange(self.options.dim))[0]}

    def references(self):
        return {"start (x = 0)": self.final(np.zeros(self.options.dim))}
