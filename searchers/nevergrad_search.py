"""Any nevergrad optimiser as a black-box searcher over the task's coefficient box."""
from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass

import numpy as np

from harness.api import Candidate, Evaluation, HarnessError, Searcher


class NevergradSearcher(Searcher):
    """A nevergrad optimiser (``-s optimizer=NAME``, default NGOpt).

    Bounds and start come from the task's space, or ``bound=B`` for a symmetric box. The batch
    size is nevergrad's ``num_workers``: NGOpt picks a different algorithm for batches (a
    population method) than for one candidate at a time (Cobyla at small budgets), and on the
    default zoo the sequential choice is much better (see README, "Benchmarks").
    ``l1`` adds ``l1 × mean|x|`` to the loss the optimiser sees (the paper's optional L1 term).

    Multi-fidelity (``screen=F`` with F < 1, e.g. 0.25): the optimiser runs on a fixed fraction F
    of the search set (the same images for every proposal, so its losses stay comparable), and
    only the ``finalists`` best distinct points it found are scored on the whole set at the end;
    the best of those is recommended. Every score counts as one evaluation of the run's budget,
    so the evaluation compute is ``(budget − finalists) × F + finalists`` full evaluations.

    Warm start (``warm=K``, K ≥ 2): the first K evaluations score the isotropic line
    ``x = α·1`` for α in ``linspace(0, 1, K)`` (task arithmetic's search, clipped to the box), and
    the optimiser then starts from the best of them instead of the space's start. They count
    towards the budget.
    """

    name = "nevergrad"
    description = "any nevergrad optimiser by name (-s optimizer=NGOpt|CMA|TwoPointsDE|Cobyla|...), black-box"
    # Measured on the default zoo (addition, seed 0, NGOpt → Cobyla, one worker): per_layer with 300
    # evaluations .870 normalised, per_task 200 .851, per_block 500 .840 (task arithmetic .782).
    default_budget = 300
    default_batch = 1
    default_space = "per_layer"

    @dataclass
    class Options:
        optimizer: str = "NGOpt"
        bound: float | None = None
        l1: float = 0.0
        screen: float = 1.0
        finalists: int = 8
        warm: int = 0

    @classmethod
    def validate(cls, options):
        import nevergrad as ng

        registry = ng.optimizers.registry
        if options.optimizer not in registry:
            close = difflib.get_close_matches(options.optimizer, list(registry), n=5)
            hint = f"; did you mean {', '.join(close)}" if close else ""
            raise HarnessError(f"unknown nevergrad optimizer '{options.optimizer}'{hint} "
                               f"({len(registry)} in nevergrad's registry, e.g. NGOpt, CMA, TwoPointsDE, Cobyla, OnePlusOne)")
        if options.bound is not None and options.bound <= 0:
            raise HarnessError(f"nevergrad option bound must be positive, got {options.bound}")
        if not 0 < options.screen <= 1:
            raise HarnessError(f"nevergrad option screen must be in (0, 1] (fraction of the search set), got {options.screen}")
        if options.finalists < 1:
            raise HarnessError(f"nevergrad option finalists must be at least 1, got {options.finalists}")
        if options.warm == 1 or options.warm < 0:
            raise HarnessError(f"nevergrad option warm must be 0 (off) or at least 2 (points on the α line), got {options.warm}")

    def __init__(self, space, budget, batch_size, seed, options):
        super().__init__(space, budget, batch_size, seed, options)
        self.validate(options)
        self._lower, self._upper = space.lower, space.upper
        if options.bound is not None:
            self._lower, self._upper = np.full(space.dim, -options.bound), np.full(space.dim, options.bound)
        # Warm start: points of the isotropic line still to ask, and the scored ones.
        warm = min(options.warm, max(budget - 1, 0))
        self._line = [np.clip(np.full(space.dim, a), self._lower, self._upper) for a in np.linspace(0, 1, warm)] if warm >= 2 else []
        self._line_scores: list[tuple[float, np.ndarray]] = []
        self._line_out = 0
        optimiser_budget = budget - len(self._line)
        # Multi-fidelity: the optimiser's own budget is the screens; then come the finalists.
        self._screens_left = max(optimiser_budget - options.finalists, 1) if options.screen < 1 else None
        self._optimiser_budget = self._screens_left or optimiser_budget
        self.opt = None
        self._pending: dict[int, object] = {}
        self.info = {"optimizer": options.optimizer, "num_workers": batch_size}
        # Screened (loss, x) pairs, the finalists still to score on the whole set (chosen once the
        # screening budget is spent) and the best fully scored (loss, x).
        self._screened: list[tuple[float, np.ndarray]] = []
        self._finalists: list[np.ndarray] | None = None
        self._best: tuple[float, np.ndarray] | None = None
        if options.screen < 1:
            self.info.update(screen=options.screen, finalists=options.finalists)
        if not self._line:
            self._start_optimiser(self.space.start)

    def _start_optimiser(self, start: np.ndarray) -> None:
        import nevergrad as ng

        param = ng.p.Array(init=np.clip(start, self._lower, self._upper)).set_bounds(self._lower, self._upper)
        param.random_state = np.random.RandomState(self.seed % 2**32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.opt = ng.optimizers.registry[self.options.optimizer](
                parametrization=param, budget=self._optimiser_budget, num_workers=self.batch_size)

    def _ask_line(self, n: int) -> list[Candidate]:
        """The next points of the warm-start line (whole search set: they pick the optimiser's start)."""
        out = self._line[self._line_out:self._line_out + n]
        self._line_out += len(out)
        return [Candidate(x=x.copy()) for x in out]

    def _line_best(self) -> np.ndarray:
        """The best-scoring point of the warm-start line (the space's start if none scored)."""
        ok = [t for t in self._line_scores if np.isfinite(t[0])]
        return (min(ok, key=lambda t: t[0])[1] if ok else self.space.start).copy()

    def _chosen(self) -> str:
        """The algorithm a meta-optimiser such as NGOpt delegated to (recorded with the run)."""
        names, o = [], self.opt
        for _ in range(6):
            inner = getattr(o, "optim", None)
            if inner is None or inner is o:
                break
            o = inner
            names.append(getattr(o, "name", type(o).__name__))
        return " -> ".join(names) if names else self.options.optimizer

    def ask(self, n):
        if self.opt is None:
            if self._line_out < len(self._line):
                return self._ask_line(n)
            start = self._line_best()
            self.info["warm_start"] = float(start.mean())
            self._start_optimiser(start)
        if self._screens_left is not None:
            if self._screens_left <= 0:
                return self._ask_finalists(n)
            n = min(n, self._screens_left)
            self._screens_left -= n
        out = []
        fidelity = self.options.screen
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(n):
                cand = self.opt.ask()
                x = np.asarray(cand.value, dtype=np.float64)
                self._pending[id(x)] = cand
                out.append(Candidate(x=x, fidelity=fidelity))
        if "chosen" not in self.info:
            try:
                self.info["chosen"] = self._chosen()
            except Exception:  # introspection only: never fail a run over it
                self.info["chosen"] = "unknown"
        return out

    def _ask_finalists(self, n: int) -> list[Candidate]:
        """The best distinct screened points, best first, to be scored on the whole set."""
        if self._finalists is None:
            chosen: list[np.ndarray] = []
            for _, x in sorted(self._screened, key=lambda t: t[0]):
                if len(chosen) == self.options.finalists:
                    break
                if not any(np.array_equal(x, y) for y in chosen):
                    chosen.append(x)
            self._finalists = chosen
        out, self._finalists = self._finalists[:n], self._finalists[n:]
        return [Candidate(x=x.copy()) for x in out]

    def tell(self, candidates: list[Candidate], evaluations: list[Evaluation]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for c, e in zip(candidates, evaluations):
                if self.opt is None:  # a warm-start line point
                    self._line_scores.append((e.loss if e.ok else float("inf"), c.x.copy()))
                    continue
                if self._screens_left is not None and c.fidelity >= 1:  # a finalist's full score
                    if e.ok and (self._best is None or e.loss < self._best[0]):
                        self._best = (e.loss, c.x.copy())
                    continue
                if self._screens_left is not None and e.ok:
                    self._screened.append((e.loss, c.x.copy()))
                loss = e.loss + self.options.l1 * float(np.abs(c.x).mean())
                self.opt.tell(self._pending.pop(id(c.x)), loss)

    def close(self):
        # Recast optimisers (Cobyla, which NGOpt picks for small sequential budgets) run scipy in a
        # non-daemon thread that waits for the next tell; stop it so the process can exit.
        o = self.opt
        for _ in range(8 if o is not None else 0):
            thread = getattr(o, "_messaging_thread", None)
            if thread is not None:
                thread.stop()
            o = getattr(o, "optim", None)
            if o is None:
                break

    def recommend(self):
        if self._best is not None:
            return self._best[1].copy()
        if self.opt is None:  # the whole budget went to the warm-start line
            return self._line_best()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(self.opt.provide_recommendation().value, dtype=np.float64)
