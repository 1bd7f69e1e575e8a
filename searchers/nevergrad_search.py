"""Any nevergrad optimiser as a black-box searcher over the task's coefficient box."""
from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass

import numpy as np

from harness.api import Candidate, Evaluation, HarnessError, Searcher, option

# nevergrad optimisers that ignore the parametrisation's random state: CmaFmin2 (which NGOpt picks
# for small, bounded, sequential problems through MetaModel) calls cma.fmin without a seed, and
# cma then seeds numpy from the clock.
CLOCK_SEEDED = ("CmaFmin2",)


class NevergradSearcher(Searcher):
    """A nevergrad optimiser (``-s optimizer=NAME``, default NGOpt).

    Bounds and start come from the task's space, or ``bound=B`` for a symmetric box. The batch
    size is nevergrad's ``num_workers``: NGOpt picks a different algorithm for batches (a
    population method) than for one candidate at a time (Cobyla at small budgets), and the
    sequential choice does better on small budgets, hence the default batch of 1.
    ``l1`` adds ``l1 × mean|x|`` to the loss the optimiser sees (the paper's optional L1 term).

    Warm start (``-s warm=K``) and multi-fidelity screening (``-s screen=F -s finalists=K``) are
    the harness's wrappers (:mod:`harness.wrappers`), which work around any searcher.
    """

    name = "nevergrad"
    description = "any nevergrad optimiser by name (-s optimizer=NGOpt|CMA|TwoPointsDE|Cobyla|...), black-box"
    default_budget = 600
    default_batch = 1
    asynchronous = True  # asks and tells in any order (nevergrad: ask/tell with num_workers)
    default_space = "per_layer"

    @dataclass
    class Options:
        optimizer: str = option("NGOpt", "nevergrad optimiser by registry name, e.g. NGOpt, CMA, TwoPointsDE, "
                                         "Cobyla, OnePlusOne")
        bound: float | None = option(None, "search the box [-bound, bound] in every coordinate (None: the task's box)",
                                     gt=0)
        l1: float = option(0.0, "add l1 × mean|x| to the loss the optimiser sees (0: no L1 term)")

    @classmethod
    def validate(cls, options):
        import nevergrad as ng

        registry = ng.optimizers.registry
        if options.optimizer not in registry:
            close = difflib.get_close_matches(options.optimizer, list(registry), n=5)
            hint = f"; did you mean {', '.join(close)}" if close else ""
            raise HarnessError(f"unknown nevergrad optimizer '{options.optimizer}'{hint} "
                               f"({len(registry)} in nevergrad's registry, e.g. NGOpt, CMA, TwoPointsDE, Cobyla, OnePlusOne)")

    def __init__(self, space, budget, batch_size, seed, options):
        import nevergrad as ng

        super().__init__(space, budget, batch_size, seed, options)
        # NGOpt's Cobyla runs scipy in a thread of its own, outside the catch_warnings blocks here;
        # scipy then warns that nevergrad's default RHOEND is invalid and replaces it (harmless
        # noise on the main command's output): a filter for that one message, for the process.
        warnings.filterwarnings("ignore", message=r"COBYLA: Invalid RHOEND", category=UserWarning)
        lower, upper = space.lower, space.upper
        if options.bound is not None:
            lower, upper = np.full(space.dim, -options.bound), np.full(space.dim, options.bound)
        param = ng.p.Array(init=np.clip(space.start, lower, upper)).set_bounds(lower, upper)
        param.random_state = np.random.RandomState(seed % 2**32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.opt = ng.optimizers.registry[options.optimizer](
                parametrization=param, budget=budget, num_workers=batch_size)
        self._pending: dict[int, object] = {}  # candidate id → nevergrad's candidate
        self.info = {"optimizer": options.optimizer, "num_workers": batch_size}
        try:
            self.info["chosen"] = self._chosen()
        except Exception:  # introspection only: never fail a run over it
            self.info["chosen"] = "unknown"
        unseeded = [m for m in CLOCK_SEEDED if m in self.info["chosen"] or m == options.optimizer]
        if unseeded:
            self.reproducible = False
            self.info["reproducible"] = False
            self.info["why_not"] = (f"{unseeded[0]} runs the cma package's fmin, which seeds itself from the clock: "
                                    "its proposals do not follow the run's seed")

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

    def _ask(self, n):
        out = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(n):
                try:
                    cand = self.opt.ask()
                except MemoryError as e:  # e.g. Cobyla's dense (dim × dim) matrices
                    raise HarnessError(f"nevergrad's {self.info.get('chosen') or self.options.optimizer} ran out of memory "
                                       f"on {self.space.dim:,} coefficients ({type(e).__name__}); search a smaller space "
                                       "(--space per_layer, fewer adapter parameters) or pick an optimiser that scales, "
                                       "e.g. -s optimizer=DiagonalCMA or OnePlusOne") from None
                c = self.candidate(np.asarray(cand.value, dtype=np.float64))
                self._pending[c.id] = cand
                out.append(c)
        return out

    def _tell(self, candidates: list[Candidate], evaluations: list[Evaluation]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for c, e in zip(candidates, evaluations):
                loss = e.loss + self.options.l1 * float(np.abs(c.x).mean())
                self.opt.tell(self._pending.pop(c.id), loss)

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

    def _recommend(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(self.opt.provide_recommendation().value, dtype=np.float64)
