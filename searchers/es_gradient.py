"""Evolution strategies: gradient descent without gradients.

Each step draws ``pairs`` Gaussian directions ε_1 … ε_P and scores the antithetic points
``x ± σ·ε_i``, every one of them on the *same* mini-batch (``Candidate.batch`` = a per-step seed,
as the gradient searcher's steps do), so the loss differences of a pair see no batch noise and,
across steps, the search reads the task's whole search split, not a fixed small subset. The
gradient estimate is

    g = 1/(2σP) · Σ_i (L(x + σε_i) − L(x − σε_i)) · ε_i            (``estimate=difference``)

or, with ``estimate=rank``, the same sum over centred ranks of the 2P losses in place of the
losses (fitness shaping: invariant to the loss's scale and robust to outliers). ``x`` then takes
an Adam step (or SGD with momentum, ``optimizer=sgd``) with optional decoupled weight decay
towards 0 (the pre-trained model), a constant or cosine learning rate and a σ that decays
geometrically to ``sigma × sigma_decay`` over the run. The searcher never asks for a gradient.

One ask is one step's 2P candidates (``default_batch`` 8 = 2 × 4 pairs), so an evaluator that
scores several candidates at once (Ray workers, a population pass) scores a step in parallel; a
smaller ``--batch-size`` hands a step out over several asks and the update waits for all of it.

What it recommends: with ``validate_every = K > 0`` the current point (see ``average``) is scored
on the whole search set (``batch=None``) every K steps and at the end, and the best of those is
recommended, as the gradient searcher does; with ``K = 0`` (default) the final point is
recommended, and the last evaluation of the budget scores it on the whole search set, so the run
records a search loss comparable with every other searcher's. ``average = A`` makes "the point"
the mean of the last A iterates (tail averaging: less noise than the last iterate).
``minibatch=false`` scores every candidate on the whole search set instead (a fixed objective,
as nevergrad sees it).

Candidates stay in the task's box: the iterate is clipped after each step and so are ``x ± σε``
(the estimate then still uses ε, a small bias at the box's faces).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from harness.api import Candidate, Evaluation, Searcher, option

OPTIMIZERS = ("adam", "sgd")
ESTIMATES = ("difference", "rank")
SCHEDULES = ("constant", "cosine")


def centred_ranks(losses: np.ndarray) -> np.ndarray:
    """Ranks of ``losses`` mapped linearly onto [-0.5, 0.5] (lowest loss → -0.5); ties share
    their mean rank, so equal losses give equal weights."""
    n = len(losses)
    if n < 2:
        return np.zeros(n)
    order = np.argsort(losses, kind="stable")
    ranks = np.empty(n)
    ranks[order] = np.arange(n, dtype=np.float64)
    for v in np.unique(losses):            # ties: the mean of their ranks
        tie = losses == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks / (n - 1) - 0.5


class EvolutionStrategy(Searcher):
    """Antithetic evolution strategies on mini-batches, with Adam: a gradient-free stochastic
    gradient descent on the coefficients (see the module docstring)."""

    name = "es"
    description = "evolution strategies: antithetic pairs on shared mini-batches, Adam on the estimate, gradient-free"
    default_budget = 1500
    default_batch = 8
    default_space = "per_layer"

    @dataclass
    class Options:
        pairs: int = option(4, "antithetic pairs x ± σε per step (a step scores 2 × pairs candidates on one "
                               "mini-batch)", ge=1)
        sigma: float = option(0.05, "perturbation scale σ, in coefficient units", gt=0)
        sigma_decay: float = option(1.0, "σ at the last step ÷ σ at the first (geometric in between; 1 keeps σ)",
                                    gt=0)
        lr: float = option(0.05, "step size of the optimiser", gt=0)
        schedule: str = option("constant", "learning rate: constant, or cosine decay to 0 over the steps",
                               choices=SCHEDULES)
        optimizer: str = option("adam", "update rule on the estimate: adam, or sgd with momentum", choices=OPTIMIZERS)
        momentum: float = option(0.9, "Adam's β1 or SGD's momentum", ge=0, lt=1)
        weight_decay: float = option(0.0, "decoupled decay of x towards 0 (the pre-trained model) per step, × lr",
                                     ge=0)
        estimate: str = option("difference", "difference: loss differences of each pair; rank: centred ranks of the "
                                             "2 × pairs losses (invariant to the loss's scale)", choices=ESTIMATES)
        minibatch: bool = option(True, "score each step on a fresh mini-batch (false: on the whole search set)")
        average: int = option(0, "recommend the mean of the last A iterates (0 or 1: the last iterate)", ge=0)
        validate_every: int = option(0, "score the point on the whole search set every K steps and recommend the "
                                        "best scored (0: the final point)", ge=0)

    def __init__(self, space, budget, batch_size, seed, options):
        super().__init__(space, budget, batch_size, seed, options)
        self.x = space.clip(space.start.astype(np.float64))
        self.m = np.zeros(space.dim)
        self.v = np.zeros(space.dim)
        self.steps = 0
        self.n_steps = self._planned_steps()
        self.recent: deque = deque([self.x.copy()], maxlen=max(1, options.average))
        self._queue: list[Candidate] = []      # candidates of the current step not yet asked
        self._step: dict | None = None          # the step waiting for its scores
        self._asked = 0
        self._since_validation = 0
        self._val_x: np.ndarray | None = None   # best point scored on the whole set by a validation
        self._val_loss = math.inf
        self.info = {"steps": 0, "planned_steps": self.n_steps, "pairs": options.pairs,
                     "validations": 0, "failed_pairs": 0}

    # -- schedule ---------------------------------------------------------------------------------
    def _planned_steps(self) -> int:
        """Steps the budget pays for (the last may have fewer pairs), as :meth:`_plan_step` spends it."""
        steps, remaining, since, every = 0, self.budget, 0, self.options.validate_every
        while remaining > 1:
            P, val = self._layout(remaining, bool(every) and since >= every)
            remaining, steps, since = remaining - 2 * P - val, steps + 1, (0 if val else since) + 1
        return max(1, steps)

    def _layout(self, remaining: int, due: bool) -> tuple[int, bool]:
        """(pairs, whether the point is scored on the whole set first) of the next step, with
        ``remaining`` evaluations left: one is kept for the final score of the answer, and a step
        never leaves exactly two (a validation is added or dropped so that the budget comes out)."""
        if remaining == 2:
            return 1, False
        P = min(self.options.pairs, (remaining - 1) // 2)
        val = due and remaining - 2 * P - 1 >= 1
        if remaining - 2 * P - val == 2:
            val = not val
        return P, val

    def _progress(self) -> float:
        return min(1.0, self.steps / max(1, self.n_steps - 1))

    def _sigma(self) -> float:
        return self.options.sigma * self.options.sigma_decay ** self._progress()

    def _lr(self) -> float:
        o = self.options
        if o.schedule == "cosine":
            return 0.5 * o.lr * (1 + math.cos(math.pi * min(1.0, self.steps / max(1, self.n_steps))))
        return o.lr

    def point(self) -> np.ndarray:
        """The current answer: the last iterate, or the mean of the last ``average`` iterates."""
        return np.mean(np.stack(self.recent), axis=0) if self.options.average > 1 else self.x.copy()

    # -- ask / tell -------------------------------------------------------------------------------
    def _plan_step(self) -> None:
        o = self.options
        remaining = self.budget - self._asked
        if remaining <= 0:
            return
        if remaining == 1:   # the last evaluation: the answer on the whole search set
            self._queue = [self.candidate(self.point())]
            self._step = {"pairs": 0, "ids": {self._queue[0].id}, "val_ids": {self._queue[0].id}, "told": {}}
            return
        due = bool(o.validate_every) and self._since_validation >= o.validate_every
        P, val = self._layout(remaining, due)
        out: list[Candidate] = []
        val_ids = set()
        if val:
            out.append(self.candidate(self.point()))
            val_ids.add(out[-1].id)
            self._since_validation = 0
        rng = np.random.default_rng([self.seed % 2**32, self.steps, 17])
        eps = rng.standard_normal((P, self.space.dim))
        s = self._sigma()
        batch = self.seed * 1_000_003 + self.steps if o.minibatch else None
        pairs = []
        for e in eps:
            plus = self.candidate(self.space.clip(self.x + s * e), batch=batch)
            minus = self.candidate(self.space.clip(self.x - s * e), batch=batch)
            out += [plus, minus]
            pairs.append((plus.id, minus.id))
        self._queue = out
        self._step = {"pairs": P, "eps": eps, "sigma": s, "pair_ids": pairs, "val_ids": val_ids,
                      "ids": {c.id for c in out}, "told": {}}

    def _ask(self, n):
        if not self._queue and self._step is None:
            self._plan_step()
        out, self._queue = self._queue[:n], self._queue[n:]
        self._asked += len(out)
        return out

    def _tell(self, candidates: list[Candidate], evaluations: list[Evaluation]):
        st = self._step
        for c, e in zip(candidates, evaluations):
            if st is None or c.id not in st["ids"]:
                continue
            st["told"][c.id] = (c, e)
            if c.id in st["val_ids"]:
                self.info["validations"] += 1
                if e.ok and math.isfinite(e.loss) and e.loss < self._val_loss:
                    self._val_x, self._val_loss = np.asarray(c.x, dtype=np.float64).copy(), float(e.loss)
        if st is not None and len(st["told"]) == len(st["ids"]):
            self._step = None
            if st["pairs"]:
                self._update(st)

    def _update(self, st: dict) -> None:
        o = self.options
        told = st["told"]
        keep, diffs, losses = [], [], []
        for k, (ip, im) in enumerate(st["pair_ids"]):
            ep, em = told[ip][1], told[im][1]
            if not (ep.ok and em.ok and math.isfinite(ep.loss) and math.isfinite(em.loss)):
                self.info["failed_pairs"] += 1
                continue
            keep.append(k)
            losses += [ep.loss, em.loss]
        self.steps += 1
        self._since_validation += 1
        self.info["steps"] = self.steps
        if keep:
            eps = st["eps"][keep]
            if o.estimate == "rank":
                w = centred_ranks(np.asarray(losses))
                diffs = w[0::2] - w[1::2]
                g = diffs @ eps / len(keep)
            else:
                diffs = np.asarray(losses[0::2]) - np.asarray(losses[1::2])
                g = diffs @ eps / (2 * st["sigma"] * len(keep))
            self._apply(g)
        self.recent.append(self.x.copy())
        self.info.update(sigma=st["sigma"], lr=self._lr())

    def _apply(self, g: np.ndarray) -> None:
        o, lr = self.options, self._lr()
        if o.optimizer == "adam":
            b1, b2, t = o.momentum, 0.999, self.steps
            self.m = b1 * self.m + (1 - b1) * g
            self.v = b2 * self.v + (1 - b2) * g * g
            step = (self.m / (1 - b1 ** t)) / (np.sqrt(self.v / (1 - b2 ** t)) + 1e-8)
        else:
            self.m = o.momentum * self.m + g
            step = self.m
        self.x = self.space.clip(self.x * (1 - lr * o.weight_decay) - lr * step)

    def _recommend(self) -> np.ndarray:
        if self.options.validate_every and self._val_x is not None:
            return self._val_x.copy()
        return self.point()
