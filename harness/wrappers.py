"""Behaviours any searcher can use, as wrappers around it (not modes inside one searcher).

- ``-s warm=K`` (:class:`WarmStart`): the first K evaluations score task arithmetic's line
  ``x = α·1`` for α in ``linspace(0, 1, K)`` (clipped to the box); the wrapped searcher then starts
  from the best of them, with the rest of the budget.
- ``-s screen=F -s finalists=K`` (:class:`Screen`): the wrapped searcher's candidates are scored
  on a fixed fraction F of the search set (the same images every time, so its losses stay
  comparable); once its budget (the run's minus K) is spent, the K best distinct screened points
  are scored on the whole set and the best of those is recommended. Compute:
  ``(budget − K)·F + K`` full evaluations.

Both count towards the run's budget and stack: warm start first, then screening.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np

from harness.api import Candidate, Evaluation, HarnessError, Plugin, Searcher, Space, check_options, option

# Factory of the wrapped searcher: (space, budget) → a searcher.
Factory = Callable[[Space, int], Searcher]


class Wrappers(Plugin):
    """The wrapper options every searcher takes through ``-s`` (unless it declares the same names)."""

    name = "wrappers"

    @dataclass
    class Options:
        warm: int = option(0, "first score K points α·1, α on linspace(0, 1, K), and start the searcher at the best "
                              "(0: off; else at least 2)", ge=0)
        screen: float = option(1.0, "score the searcher's candidates on this fixed fraction of the search set, then "
                                    "the finalists on all of it (1: off)", gt=0, le=1)
        finalists: int = option(8, "with screen < 1: the best distinct screened points scored on the whole search set",
                                ge=1)

    @classmethod
    def validate(cls, options):
        check_options("searcher", options)  # called directly by the planner, not through the registry
        if options.warm == 1:
            raise HarnessError("searcher option warm must be 0 (off) or at least 2 (points on the α line), got 1")


def wrap(factory: Factory, space: Space, budget: int, options, batch_size: int, seed: int) -> Searcher:
    """The searcher ``factory`` makes, inside the wrappers ``options`` (a ``Wrappers.Options``) ask for."""
    if options.screen < 1:
        inner, F, K = factory, options.screen, options.finalists
        factory = lambda sp, b: Screen(inner, sp, b, batch_size, seed, F, K)  # noqa: E731
    if options.warm:
        return WarmStart(factory, space, budget, batch_size, seed, options.warm)
    return factory(space, budget)


class _Wrapper(Searcher):
    """A searcher around another; its ``info`` is the inner one's plus its own."""

    Options = Wrappers.Options

    def __init__(self, space, budget, batch_size, seed):
        super().__init__(space, budget, batch_size, seed, Wrappers.Options())
        self._next_id = 10**9  # the wrapper's own candidates never share an id with the inner's
        self.inner: Searcher | None = None
        self.own: dict = {}

    def _sync(self) -> None:
        self.info = {**(self.inner.info if self.inner is not None else {}), **self.own}

    @property
    def reproducible(self) -> bool:
        """The inner searcher's (a wrapper draws only from its seed); True before it exists."""
        return self.inner.reproducible if self.inner is not None else True

    @reproducible.setter
    def reproducible(self, value: bool) -> None:  # the base class sets it; a wrapper defers to its inner
        pass

    def ask(self, n):
        out = super().ask(n)
        self._sync()
        return out

    def tell(self, candidates, evaluations):
        super().tell(candidates, evaluations)
        self._sync()

    def recommend(self):
        out = super().recommend()
        self._sync()
        return out

    def close(self):
        if self.inner is not None:
            self.inner.close()


class WarmStart(_Wrapper):
    """Score ``k`` points of the isotropic line first; start the wrapped searcher at the best."""

    def __init__(self, factory: Factory, space: Space, budget: int, batch_size: int, seed: int, k: int):
        super().__init__(space, budget, batch_size, seed)
        self.factory = factory
        k = min(k, max(budget - 1, 0))
        self.line = [space.clip(np.full(space.dim, a)) for a in np.linspace(0, 1, k)] if k >= 2 else []
        self.scores: list[tuple[float, np.ndarray]] = []
        self.out = 0
        if not self.line:
            self.inner = factory(space, budget)

    def _line_best(self) -> np.ndarray:
        ok = [t for t in self.scores if np.isfinite(t[0])]
        return (min(ok, key=lambda t: t[0])[1] if ok else self.space.start).copy()

    def _ask(self, n):
        if self.inner is None:
            if self.out < len(self.line):
                pts = self.line[self.out:self.out + n]
                self.out += len(pts)
                return [Candidate(x=x.copy()) for x in pts]
            start = self._line_best()
            self.own["warm_start"] = float(start.mean())
            self.inner = self.factory(dataclasses.replace(self.space, start=start), self.budget - len(self.line))
        return self.inner.ask(n)

    def _tell(self, candidates, evaluations):
        if self.inner is None:  # line points
            self.scores += [(e.loss if e.ok else float("inf"), c.x.copy()) for c, e in zip(candidates, evaluations)]
            return
        self.inner.tell(candidates, evaluations)

    def _recommend(self):
        if self.inner is None:
            return self._line_best()
        if not self.line:
            return self.inner.recommend()
        # The line's best stands when no whole-set score of the inner search beat it (an inner
        # searcher that scores only its answer on the whole set may end above the line).
        line = min((t[0] for t in self.scores if np.isfinite(t[0])), default=np.inf)
        return self._line_best() if line <= self.inner.best_loss else self.inner.recommend()


class Screen(_Wrapper):
    """Run the wrapped searcher on a fraction of the search set; score finalists on all of it."""

    def __init__(self, factory: Factory, space: Space, budget: int, batch_size: int, seed: int,
                 fraction: float, finalists: int):
        super().__init__(space, budget, batch_size, seed)
        self.fraction, self.k = fraction, finalists
        self.screens_left = max(budget - finalists, 1)
        self.inner = factory(space, self.screens_left)
        self.screened: list[tuple[float, np.ndarray]] = []
        self.finalists: list[np.ndarray] | None = None
        self.own = {"screen": fraction, "finalists": finalists}

    def _ask(self, n):
        if self.screens_left > 0:
            out = self.inner.ask(min(n, self.screens_left))
            self.screens_left -= len(out)
            for c in out:
                c.fidelity = self.fraction
            return out
        if self.finalists is None:
            chosen: list[np.ndarray] = []
            for _, x in sorted(self.screened, key=lambda t: t[0]):
                if len(chosen) == self.k:
                    break
                if not any(np.array_equal(x, y) for y in chosen):
                    chosen.append(x)
            self.finalists = chosen
        out, self.finalists = self.finalists[:n], self.finalists[n:]
        return [Candidate(x=x.copy()) for x in out]

    def _tell(self, candidates: list[Candidate], evaluations: list[Evaluation]):
        screens = [(c, e) for c, e in zip(candidates, evaluations) if c.fidelity < 1]
        self.screened += [(e.loss, c.x.copy()) for c, e in screens if e.ok]
        if screens:
            self.inner.tell([c for c, _ in screens], [e for _, e in screens])

    def _recommend(self):
        return self.best_x.copy() if np.isfinite(self.best_loss) else self.inner.recommend()
