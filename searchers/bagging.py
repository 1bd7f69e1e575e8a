"""Bagged black-box search: nevergrad rounds on resampled mini-batches, their optima averaged.

Why: a black-box optimiser scored on the task's fixed search set (a few dozen images per data set)
fits that set as well as gradient descent does, but generalises worse, because gradient descent's
mini-batches come from the whole validation split. This searcher splits the budget into
``rounds``; round r runs its own nevergrad optimiser (default NGOpt, which picks Cobyla for these
budgets) on one fixed mini-batch, ``Candidate.batch`` = a seed drawn from the run's seed and r, so
within a round the objective is deterministic, as Cobyla needs, while the rounds together read
``rounds`` different samples of the validation split. The round optima are averaged (bagging:
each round's overfit is to a different sample, and the mean cancels part of it), and the last
evaluation of the budget scores that mean on the whole search set, so the run records a search
loss comparable with every other searcher's. The mean is recommended.

``chain=true`` (default) starts each round at the running mean of the earlier rounds' optima; with
``chain=false`` every round starts at the space's start (independent rounds); ``combine=best`` recommends the
point with the lowest whole-search-set loss among the round optima and their mean (each scored
there, ``rounds + 1`` evaluations at the end) instead of the mean.

The mini-batch's size is the task's (``-t batch_size``). ``info["rounds"]`` records each round's
budget, the algorithm NGOpt chose and the best mini-batch loss it reached.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from harness.api import Candidate, Evaluation, HarnessError, Searcher, Space, option
from atlas_harness_searchers.nevergrad_search import NevergradSearcher

COMBINES = ("mean", "best")


class Bagging(Searcher):
    """Nevergrad rounds on resampled fixed mini-batches, optima averaged (module docstring)."""

    name = "bagging"
    description = "nevergrad rounds on resampled mini-batches, round optima averaged (bagging), black-box"
    default_budget = 1201           # 4 rounds × 300 mini-batch evaluations + the final score
    default_batch = 1
    default_space = "per_layer"

    @dataclass
    class Options:
        rounds: int = option(4, "nevergrad rounds, each on its own fixed mini-batch (the budget is split between them)",
                             ge=1)
        optimizer: str = option("NGOpt", "nevergrad optimiser of every round, by registry name")
        chain: bool = option(True, "start each round at the mean of the earlier rounds' optima "
                                   "(false: at the space's start)")
        combine: str = option("mean", "mean: recommend the mean of the round optima; best: the one of the optima and "
                                      "their mean with the lowest whole-search-set loss (rounds + 1 final evaluations)",
                              choices=COMBINES)

    @classmethod
    def validate(cls, options):
        NevergradSearcher.validate(NevergradSearcher.Options(optimizer=options.optimizer))

    def __init__(self, space: Space, budget: int, batch_size: int, seed: int, options):
        super().__init__(space, budget, batch_size, seed, options)
        final = options.rounds + 1 if options.combine == "best" else 1
        per_round = (budget - final) // options.rounds
        if per_round < 2:
            raise HarnessError(f"bagging needs at least 2 evaluations per round: budget {budget} with "
                               f"rounds={options.rounds} (and {final} final evaluation(s)); "
                               f"raise --budget to {options.rounds * 2 + final} or lower rounds")
        self.budgets = [per_round] * options.rounds
        self.budgets[-1] += budget - final - per_round * options.rounds   # the remainder: last round
        rng = np.random.default_rng([seed % 2**32, 7])
        self.batches = [int(b) for b in rng.integers(0, 2**31 - 1, size=options.rounds)]
        self._r, self._inner, self._asked_in_round = 0, None, 0
        self._pending: dict[int, tuple[int, Candidate]] = {}   # id → (round, inner candidate)
        self.optima: list[np.ndarray] = []
        self._round_best: tuple[float, np.ndarray] | None = None
        # After the rounds: the points scored on the whole search set (the mean, then with
        # combine=best each optimum), handed out at most a batch at a time, and their losses.
        self._final: list[np.ndarray] | None = None
        self._final_asked = 0
        self._final_pending: dict[int, int] = {}         # id → index in _final
        self._final_losses: dict[int, float] = {}        # index in _final → loss
        self.info = {"optimizer": options.optimizer, "num_workers": batch_size,
                     "rounds": [{"budget": b, "batch": s} for b, s in zip(self.budgets, self.batches)]}

    def _start_round(self) -> None:
        r = self._r
        start = self.space.start
        if self.options.chain and self.optima:
            start = np.mean(self.optima, axis=0)
        inner_space = Space(dim=self.space.dim, lower=self.space.lower, upper=self.space.upper,
                            start=self.space.clip(start), labels=self.space.labels, kind=self.space.kind)
        seed = int(np.random.SeedSequence([self.seed % 2**32, r]).generate_state(1)[0])
        self._inner = NevergradSearcher(inner_space, self.budgets[r], self.batch_size, seed,
                                        NevergradSearcher.Options(optimizer=self.options.optimizer))
        self._asked_in_round, self._round_best = 0, None

    def _end_round(self) -> None:
        info = self.info["rounds"][self._r]
        info["chosen"] = self._inner.info.get("chosen", self.options.optimizer)
        loss, x = self._round_best if self._round_best else (math.inf, self._inner.space.start)
        info["best_loss"] = loss if math.isfinite(loss) else None
        self.optima.append(x.copy())
        self._inner.close()
        self._inner = None
        self._r += 1

    def _ask(self, n: int) -> list[Candidate]:
        out: list[Candidate] = []
        while len(out) < n:
            if self._r < self.options.rounds:
                if self._inner is None:
                    self._start_round()
                left = self.budgets[self._r] - self._asked_in_round
                if left <= 0:
                    if any(r == self._r for r, _ in self._pending.values()):
                        break                      # wait for the round's last scores
                    self._end_round()
                    continue
                for ic in self._inner.ask(min(n - len(out), left)):
                    c = self.candidate(self.space.clip(ic.x), batch=self.batches[self._r])
                    self._pending[c.id] = (self._r, ic)
                    out.append(c)
                    self._asked_in_round += 1
                continue
            if self._final is None:
                if self._pending:
                    break                          # the last round is still being scored
                mean = self.space.clip(np.mean(self.optima, axis=0))
                self._final = [mean] + (self.optima if self.options.combine == "best" else [])
            while len(out) < n and self._final_asked < len(self._final):
                c = self.candidate(self._final[self._final_asked].copy())
                self._final_pending[c.id] = self._final_asked
                self._final_asked += 1
                out.append(c)
            break
        return out

    def _tell(self, candidates: list[Candidate], evaluations: list[Evaluation]) -> None:
        inner_c, inner_e = [], []
        for c, e in zip(candidates, evaluations):
            loss = e.loss if e.ok and math.isfinite(e.loss) else math.inf
            if c.id in self._final_pending:         # a final whole-search-set score
                self._final_losses[self._final_pending.pop(c.id)] = loss
                continue
            _, ic = self._pending.pop(c.id)
            inner_c.append(ic)
            inner_e.append(e)
            if self._round_best is None or loss < self._round_best[0]:
                self._round_best = (loss, np.asarray(c.x, dtype=np.float64).copy())
        if inner_c and self._inner is not None:
            self._inner.tell(inner_c, inner_e)

    def _recommend(self) -> np.ndarray:
        if not self.optima:
            return self.best_x.copy()
        if self._final is not None and len(self._final_losses) == len(self._final) > 1:   # combine=best
            return self._final[min(self._final_losses, key=self._final_losses.get)].copy()
        return self.space.clip(np.mean(self.optima, axis=0))

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()
