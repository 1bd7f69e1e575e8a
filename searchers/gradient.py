"""Gradient-based coefficient learning, as in the aTLAS paper."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from harness.api import Candidate, Evaluation, Searcher, option


class GradientSearcher(Searcher):
    """AdamW on the coefficients with the paper's defaults (lr 1e-3, weight decay 0.1, clip 1.0).

    Each evaluation of the budget is either a stochastic step (loss and gradient on a random
    mini-batch of the search split) or, every ``validate_every`` steps and at the very end, a
    validation: the current coefficients scored on the whole search split. The recommendation is
    the best validated point (the paper keeps the best checkpoint on validation).
    """

    name = "gradient"
    description = "aTLAS gradient descent on the coefficients (AdamW, paper defaults), best point on validation"
    needs_gradient = True
    max_batch = 1
    default_budget = 300
    default_batch = 1
    default_space = "per_block"

    @dataclass
    class Options:
        lr: float = option(1e-3, "learning rate of AdamW (peak rate with warmup or cosine)", gt=0)
        weight_decay: float = option(0.1, "AdamW's decoupled weight decay (pulls the coefficients towards 0)")
        clip: float = option(1.0, "clip the gradient's norm to this (0: no clipping)")
        schedule: str = option("constant", "learning rate after warmup: constant, or cosine decay to 0 over the steps",
                               choices=("constant", "cosine"))
        warmup: int = option(0, "steps of linear warmup to lr (0: none)")
        validate_every: int = option(25, "score the coefficients on the whole search split every K steps and "
                                         "recommend the best scored (0: only at the end)", ge=0)
        # The paper does not bound the coefficients (they reach about ±2.5); black-box searchers
        # need the task's box, the gradient does not unless asked to.
        bounded: bool = option(False, "clip the coefficients to the task's box after each step "
                                      "(false: unbounded, as in the paper)")

    def __init__(self, space, budget, batch_size, seed, options):
        super().__init__(space, budget, batch_size, seed, options)
        # float64 so that a resumed run, fed the recorded gradients, retraces the same path exactly.
        self.x = torch.tensor(space.start, dtype=torch.float64, requires_grad=True)
        self.opt = torch.optim.AdamW([self.x], lr=options.lr, weight_decay=options.weight_decay)
        self.lower = torch.tensor(space.lower, dtype=torch.float64)
        self.upper = torch.tensor(space.upper, dtype=torch.float64)
        self.used = self.steps = self.since_validation = 0
        self.n_steps = self._planned_steps()
        self.info = {"steps": 0, "validations": 0}

    def _planned_steps(self) -> int:
        v = self.options.validate_every
        n_val = (self.budget // (v + 1) if v else 0) + 1
        return max(1, self.budget - n_val)

    def _lr(self) -> float:
        o, s = self.options, self.steps
        if o.warmup and s < o.warmup:
            return o.lr * (s + 1) / o.warmup
        if o.schedule == "cosine":
            t = min(1.0, (s - o.warmup) / max(1, self.n_steps - o.warmup))
            return 0.5 * o.lr * (1 + math.cos(math.pi * t))
        return o.lr

    def _ask(self, n):
        x = self.x.detach().numpy().copy()
        last = self.used == self.budget - 1
        due = self.options.validate_every and self.since_validation >= self.options.validate_every
        if last or due:
            return [Candidate(x=x)]
        # The mini-batch seed depends on the run seed and the step: resumable and reproducible.
        return [Candidate(x=x, grad=True, batch=self.seed * 1_000_003 + self.steps)]

    def _tell(self, candidates: list[Candidate], evaluations: list[Evaluation]):
        for c, e in zip(candidates, evaluations):
            self.used += 1
            if not c.grad:
                self.since_validation = 0
                self.info["validations"] += 1  # the base class keeps the best validated point
                continue
            self.since_validation += 1
            if not e.ok or e.grad is None:
                continue  # a failed step (NaN loss) is skipped, not applied
            for group in self.opt.param_groups:
                group["lr"] = self._lr()
            self.opt.zero_grad()
            self.x.grad = torch.as_tensor(np.asarray(e.grad, dtype=np.float64)).clone()
            if self.options.clip:
                torch.nn.utils.clip_grad_norm_([self.x], self.options.clip)
            self.opt.step()
            if self.options.bounded:
                with torch.no_grad():
                    self.x.copy_(torch.maximum(torch.minimum(self.x, self.upper), self.lower))
            self.steps += 1
            self.info["steps"] = self.steps

    def _recommend(self):
        if math.isfinite(self.best_loss):
            return self.best_x.copy()
        return self.x.detach().numpy().copy()
