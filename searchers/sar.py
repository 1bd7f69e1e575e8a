"""SAR (Niu et al., ICLR 2023): sharpness-aware and reliable entropy minimisation for test-time adaptation."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from harness.api import Candidate, Evaluation, Searcher, option


class SarSearcher(Searcher):
    """SAR's optimiser over any space (its paper's: ``--space norms`` on ``--task tta`` with
    ``-t objective=entropy -t reliable=0.4``, the reliable-sample entropy).

    Each step is two gradient evaluations on one mini-batch: the gradient g at x, then the
    gradient at the sharpness-aware point x + ρ·g/‖g‖, which SGD with momentum applies at x
    (SAM). Model recovery: an exponential moving average of the second evaluation's loss
    (weight ``ema``) falling below ``reset_below`` means the model has collapsed onto confident
    wrong predictions, so x, the momentum and the average return to the start. Every
    ``validate_every`` steps and at the end the current point is scored on the whole set; SAR is
    an online method, so the recommendation is the last point (``recommend=last``), or the best
    whole-set score (``best``).
    """

    name = "sar"
    description = "SAR: sharpness-aware (SAM) SGD on a reliable-entropy objective, with model recovery"
    needs_gradient = True
    max_batch = 1
    default_budget = 200
    default_batch = 1
    default_space = "norms"

    @dataclass
    class Options:
        lr: float = option(1e-3, "SGD learning rate", gt=0)
        momentum: float = option(0.9, "SGD momentum", ge=0, lt=1)
        rho: float = option(0.05, "radius of SAM's ascent step, ρ·g/‖g‖", ge=0)
        reset_below: float = option(0.2, "model recovery: reset to the start when the moving average of the loss "
                                         "falls below this (0: never); SAR's 0.2 nats was set for 1000 classes, "
                                         "scale it by ln(C) / ln(1000) for C classes", ge=0)
        ema: float = option(0.9, "weight of the past in that moving average", ge=0, lt=1)
        validate_every: int = option(25, "score the current point on the whole set every K steps (0: only at the end)",
                                     ge=0)
        recommend: str = option("last", "the answer: the last point (online adaptation) or the best whole-set score",
                                choices=("last", "best"))

    def __init__(self, space, budget, batch_size, seed, options):
        super().__init__(space, budget, batch_size, seed, options)
        self.start = np.asarray(space.start, dtype=np.float64).copy()
        self.x, self.velocity = self.start.copy(), np.zeros_like(self.start)
        self.used = self.steps = self.since_validation = 0
        self.phase, self.ascended_from = "ascend", None
        self.average: float | None = None
        self.info = {"steps": 0, "resets": 0, "validations": 0}

    def _batch_seed(self) -> int:
        return self.seed * 1_000_003 + self.steps

    def _ask(self, n):
        last = self.used == self.budget - 1
        due = self.options.validate_every and self.since_validation >= self.options.validate_every
        if self.phase == "ascend" and (last or due):
            return [Candidate(x=self.x.copy())]
        if self.phase == "descend":
            return [Candidate(x=self.ascended_from.copy(), grad=True, batch=self._batch_seed())]
        return [Candidate(x=self.x.copy(), grad=True, batch=self._batch_seed())]

    def _tell(self, candidates: list[Candidate], evaluations: list[Evaluation]):
        o = self.options
        for c, e in zip(candidates, evaluations):
            self.used += 1
            if not c.grad:
                self.since_validation = 0
                self.info["validations"] += 1
                continue
            if not e.ok or e.grad is None:  # a failed evaluation skips the step
                self.phase = "ascend"
                self.steps += 1
                continue
            g = np.asarray(e.grad, dtype=np.float64)
            if self.phase == "ascend":
                norm = float(np.linalg.norm(g))
                self.ascended_from = self.x + (o.rho * g / norm if norm > 0 else 0.0)
                self.phase = "descend"
                continue
            self.velocity = o.momentum * self.velocity + g
            self.x = self.x - o.lr * self.velocity
            self.phase, self.steps = "ascend", self.steps + 1
            self.since_validation += 1
            self.info["steps"] = self.steps
            if math.isfinite(e.loss):
                self.average = e.loss if self.average is None else o.ema * self.average + (1 - o.ema) * e.loss
            if o.reset_below and self.average is not None and self.average < o.reset_below:
                self.x, self.velocity, self.average = self.start.copy(), np.zeros_like(self.start), None
                self.info["resets"] += 1

    def _recommend(self):
        if self.options.recommend == "best" and math.isfinite(self.best_loss):
            return self.best_x.copy()
        return self.x.copy()
