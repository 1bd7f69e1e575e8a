"""Coarse-to-fine black-box search: nevergrad over ever finer groupings of the task's coordinates.

The run's budget is split into stages (default ``per_task`` → ``per_layer`` → ``per_block``). Stage
k searches one offset per *group* of coordinates, around the best point found so far:

    x = clip(x_best + step_k · u[group(i)])          for every coordinate i,

with a nevergrad optimiser (:class:`atlas_harness_searchers.nevergrad_search.NevergradSearcher`, composed, not
copied) over the reduced vector ``u`` in the box ``|u| ≤ radius_k / step_k``. Its first move is one
``step_k`` (Cobyla's initial simplex is x0 + e_j), and ``radius_k`` bounds how far stage k can move
a group from where it started. Each stage multiplies both by ``shrink``; the default 1 keeps
them (step 0.3, box ±1.5 in every stage). The groupings come from ``Space.labels``
(``"fashion/_blocks.13._bn0.weight"``):

- ``per_task``: the task name before ``/``;
- ``per_layer``: task and layer, the layer given by :func:`harness.composition.layer_of` (the
  function the ``per_layer`` space itself uses) on the block name (``#k`` partition suffixes dropped);
- ``per_block``: task and block;
- ``full``: every coordinate on its own.

A label without ``/`` (or a space without labels) is a group of its own in every grouping, and a
stage whose grouping is the same partition as the one before it is merged into it (its budget is
added), so on an unlabelled space this is one nevergrad run with the first stage's step and radius.

Bookkeeping that keeps every evaluation a new point:

- a proposal already scored (a stage's start, which is its optimiser's first proposal; Cobyla's
  restarts) is answered from memory, not evaluated again;
- a group whose start sits near the upper bound moves down for positive ``u`` (``flipped`` in the
  record), so its first probes are not all clipped to the same point;
- a stage whose optimiser proposes more than a simplex of scored points in a row (converged, or
  cycling) ends early and gives its unused budget to the next stage; the last stage restarts
  around the best point with half its step and box (``converged``/``restart`` in the record).

``info["stages"]`` records per stage its grouping, reduced dimension, budget, first and last
evaluation (1-based, in the run's trace), step, radius, the algorithm NGOpt chose, the loss it
started from, its best loss, and how many proposals it answered from memory.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from harness.api import Candidate, Evaluation, HarnessError, Searcher, Space, option
from harness.composition import layer_of
from atlas_harness_searchers.nevergrad_search import NevergradSearcher

GROUPINGS = ("per_task", "per_layer", "per_block", "full")
# Budget shares of the default three stages; any other number of stages splits equally by default.
DEFAULT_SPLITS = {("per_task", "per_layer", "per_block"): (0.1, 0.3, 0.6)}


def groups_of(labels: list[str] | None, dim: int, grouping: str) -> np.ndarray:
    """Group index (0, 1, … in order of first appearance) of each coordinate under ``grouping``."""
    if grouping not in GROUPINGS:
        raise HarnessError(f"unknown grouping {grouping!r}; valid: {', '.join(GROUPINGS)}")
    if labels is None or len(labels) != dim:
        return np.arange(dim)
    keys = []
    for i, label in enumerate(labels):
        task, sep, rest = str(label).partition("/")
        if not sep or grouping == "full":
            keys.append(("own", i))
            continue
        block = re.sub(r"#\d+$", "", rest)
        keys.append({"per_task": (task,), "per_layer": (task, layer_of(block)),
                     "per_block": (task, block)}[grouping])
    index: dict = {}
    return np.array([index.setdefault(k, len(index)) for k in keys], dtype=np.int64)


def allocate(budget: int, shares: list[float]) -> list[int]:
    """Split ``budget`` into integer parts proportional to ``shares`` (largest remainders; ties go
    to the later stage, which refines)."""
    total = float(sum(shares))
    raw = [budget * s / total for s in shares]
    parts = [int(math.floor(r)) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (raw[i] - parts[i], i), reverse=True)
    for i in order[: budget - sum(parts)]:
        parts[i] += 1
    return parts


@dataclass
class _Stage:
    name: str
    gid: np.ndarray          # group of each coordinate (after the seeded shuffle)
    budget: int
    optimizer: str
    step: float
    radius: float
    inner: NevergradSearcher | None = None
    anchor: np.ndarray | None = None     # the point the stage searches around
    sign: np.ndarray | None = None       # per group: +1, or -1 where a step up would leave the box
    asked: int = 0
    told: int = 0                        # tells to the inner optimiser, answers from memory included
    streak: int = 0                      # proposals answered from memory in a row
    done: bool = False                   # converged (or out of its optimiser's budget): ends early
    info: dict | None = None


class CoarseToFine(Searcher):
    """Stages of nevergrad (default NGOpt) over coarser-to-finer groups of coefficients.

    ``stages`` names the groupings in order (``per_task``, ``per_layer``, ``per_block``, ``full``);
    ``splits`` their shares of the budget (normalised; default 0.1,0.3,0.6 for the default three
    stages, equal shares otherwise); ``optimizer`` one nevergrad name for every stage or one per
    stage. ``step`` is the first stage's initial move and ``radius`` the half-width of its box
    around its start (coefficient units); each later stage multiplies both by ``shrink`` (< 1
    shrinks, > 1 grows them). ``shuffle`` orders the reduced coordinates by a seeded permutation, so
    a stage too short for its optimiser's initial design (Cobyla probes one coordinate per
    evaluation) probes groups from every task rather than the first tasks' only."""

    name = "coarse-to-fine"
    description = "nevergrad stages over coarser-to-finer coefficient groups (per_task → per_layer → per_block), black-box"
    default_budget = 300
    default_batch = 1
    default_space = "per_block"

    @dataclass
    class Options:
        stages: tuple[str, ...] = option(("per_task", "per_layer", "per_block"),
                                         "groupings searched in order, comma-separated", choices=GROUPINGS)
        splits: tuple[float, ...] | None = option(None, "budget share of each stage, comma-separated and normalised "
                                                        "(None: 0.1,0.3,0.6 for the default stages, else equal shares)",
                                                  gt=0)
        optimizer: tuple[str, ...] = option(("NGOpt",), "nevergrad optimiser of every stage, or one per stage "
                                                        "(comma-separated)")
        step: float = option(0.3, "first stage's initial move per group, in coefficient units (the optimiser's "
                                  "first probes)", gt=0)
        radius: float = option(1.5, "half-width of the first stage's box around its start, in coefficient units "
                                    "(at least step)", gt=0)
        shrink: float = option(1.0, "each later stage multiplies step and radius by this (< 1 shrinks, > 1 grows; "
                                    "1 keeps them)", gt=0)
        shuffle: bool = option(True, "order each stage's groups by a seeded permutation, so a short stage probes "
                                     "groups of every task")

    @classmethod
    def validate(cls, options):
        stages = tuple(options.stages)
        if not stages:
            raise HarnessError(f"coarse-to-fine option stages needs at least one of {', '.join(GROUPINGS)}")
        if options.splits is not None:
            splits = tuple(options.splits)
            if len(splits) != len(stages):
                raise HarnessError(f"coarse-to-fine option splits needs one share per stage: {len(splits)} "
                                   f"given for {len(stages)} stages ({','.join(stages)})")
        opts = tuple(options.optimizer)
        if len(opts) not in (1, len(stages)):
            raise HarnessError(f"coarse-to-fine option optimizer takes one nevergrad name or one per stage: "
                               f"{len(opts)} given for {len(stages)} stages")
        for o in opts:
            NevergradSearcher.validate(NevergradSearcher.Options(optimizer=o))
        if options.radius < options.step:
            raise HarnessError(f"coarse-to-fine option radius ({options.radius}) must be at least step "
                               f"({options.step}): a stage's box has to hold its first move")

    def __init__(self, space: Space, budget: int, batch_size: int, seed: int, options):
        super().__init__(space, budget, batch_size, seed, options)
        names = tuple(options.stages)
        splits = options.splits if options.splits is not None else DEFAULT_SPLITS.get(names, (1.0,) * len(names))
        opts = tuple(options.optimizer) * (len(names) if len(options.optimizer) == 1 else 1)
        # Merge a stage into the one before when their groupings are the same partition.
        plan: list[dict] = []
        for k, (name, share, opt) in enumerate(zip(names, splits, opts)):
            gid = groups_of(space.labels, space.dim, name)
            if plan and np.array_equal(plan[-1]["gid"], gid):
                plan[-1]["share"] += share
                plan[-1]["merged"].append(name)
                continue
            plan.append({"name": name, "gid": gid, "share": float(share), "optimizer": opt,
                         "step": options.step * options.shrink ** len(plan),
                         "radius": options.radius * options.shrink ** len(plan), "merged": [name]})
        parts = allocate(budget, [p["share"] for p in plan])
        self.stages: list[_Stage] = []
        for k, (p, b) in enumerate(zip(plan, parts)):
            if b == 0:
                continue
            gid = p["gid"]
            if options.shuffle:
                perm = np.random.default_rng([seed % 2**32, k, 1]).permutation(int(gid.max()) + 1)
                gid = perm[gid]
            self.stages.append(_Stage(name="+".join(p["merged"]), gid=gid, budget=b, optimizer=p["optimizer"],
                                      step=p["step"], radius=p["radius"]))
        self._k = 0
        self._pending: dict[int, tuple[_Stage, Candidate]] = {}
        self._asked = 0
        self._x, self._loss = space.clip(space.start), math.inf   # best told so far, at any fidelity
        self._seen: dict[bytes, float] = {}   # every point told → its loss
        self.info = {"optimizer": list(opts), "num_workers": batch_size,
                     "stages": [{"stage": s.name, "dim": int(s.gid.max()) + 1, "budget": s.budget,
                                 "optimizer": s.optimizer, "step": s.step, "radius": s.radius}
                                for s in self.stages]}

    # -- stages -------------------------------------------------------------------------------
    def _start(self, k: int) -> _Stage:
        st = self.stages[k]
        G = int(st.gid.max()) + 1
        box = st.radius / st.step
        inner_space = Space(dim=G, lower=-box, upper=box, start=np.zeros(G), kind=f"coarse:{st.name}")
        seed = int(np.random.SeedSequence([self.seed % 2**32, k]).generate_state(1)[0])
        # Room for G + 2 answers from memory (the start, a simplex of repeats) besides the evaluations.
        st.inner = NevergradSearcher(inner_space, st.budget + G + 2, self.batch_size, seed,
                                     NevergradSearcher.Options(optimizer=st.optimizer))
        st.anchor = self._x.copy()
        # A group whose first move up would mostly be clipped (its start is near the upper bound,
        # e.g. Iso-C's best α at the box's edge) moves down for positive u instead, so the
        # optimiser's first probes are not all the same clipped point.
        count = np.bincount(st.gid, minlength=G)
        up = np.bincount(st.gid, weights=self.space.upper - st.anchor, minlength=G) / count
        down = np.bincount(st.gid, weights=st.anchor - self.space.lower, minlength=G) / count
        st.sign = np.where((up < st.step) & (down > up), -1.0, 1.0)
        known = math.isfinite(self._loss)
        st.info = self.info["stages"][k]
        st.info.update(first_eval=self._asked + 1, last_eval=None, evaluations=0, reused=0,
                       flipped=int((st.sign < 0).sum()), start_loss=self._loss if known else None,
                       best_loss=None)
        return st

    def _finish(self, st: _Stage) -> None:
        if st.inner is not None:
            st.info["chosen"] = st.inner.info.get("chosen", st.optimizer)
            st.inner.close()
            st.inner = None

    def _end_early(self, k: int) -> None:
        """Stage k converged: its unused budget goes to the next stage, or to a restart of the
        last stage around the best point with half its step and box."""
        st = self.stages[k]
        spare = st.budget - st.asked
        st.budget = st.asked
        st.info.update(budget=st.asked, converged=True)
        self._finish(st)
        if spare <= 0:
            return
        if k + 1 < len(self.stages):
            self.stages[k + 1].budget += spare
            self.info["stages"][k + 1]["budget"] += spare
            return
        restart = _Stage(name=st.name, gid=st.gid, budget=spare, optimizer=st.optimizer,
                         step=st.step / 2, radius=st.radius / 2)
        self.stages.append(restart)
        self.info["stages"].append({"stage": st.name, "dim": int(st.gid.max()) + 1, "budget": spare,
                                    "optimizer": st.optimizer, "step": restart.step,
                                    "radius": restart.radius, "restart": True})

    def _expand(self, st: _Stage, u: np.ndarray) -> np.ndarray:
        y = st.sign * np.asarray(u, dtype=np.float64)
        return self.space.clip(st.anchor + st.step * y[st.gid])

    # -- ask / tell ---------------------------------------------------------------------------
    def _ask(self, n: int) -> list[Candidate]:
        while True:
            while self._k < len(self.stages) and self.stages[self._k].asked >= self.stages[self._k].budget:
                self._finish(self.stages[self._k])
                self._k += 1
            if self._k >= len(self.stages):
                return []
            st = self.stages[self._k]
            if st.inner is None:
                st = self._start(self._k)
            out = self._ask_stage(st, min(n, st.budget - st.asked))
            if st.done:
                self._end_early(self._k)
            if out:
                return out

    def _ask_stage(self, st: _Stage, want: int) -> list[Candidate]:
        G = int(st.gid.max()) + 1
        out: list[Candidate] = []
        # Stop after more than a simplex of repeats in a row (converged, or cycling on clipped
        # points), or when the optimiser's own budget is spent (it would then propose random points).
        # A guard: past 64 stages (restarts halve the step each time) a stage no longer ends early,
        # and answers at most a simplex of repeats in a row from memory, so asking always ends.
        can_end = len(self.stages) < 64
        while len(out) < want:
            if can_end and (st.told >= st.budget + G + 2 or st.streak > G + 1):
                st.done = True
                break
            (ic,) = st.inner.ask(1)
            x = self._expand(st, ic.x)
            key = x.tobytes()
            if key in self._seen and (can_end or st.streak <= G + 1):
                # Already scored (e.g. the stage's start): answer from memory, do not evaluate again.
                st.inner.tell([ic], [Evaluation(loss=self._seen[key])])
                st.told += 1
                st.streak += 1
                st.info["reused"] += 1
                continue
            st.streak = 0
            c = self.candidate(x)
            self._pending[c.id] = (st, ic)
            out.append(c)
        st.asked += len(out)
        self._asked += len(out)
        if out:
            st.info["last_eval"] = self._asked
        st.info["evaluations"] = st.asked
        if "chosen" not in st.info and st.inner is not None and "chosen" in st.inner.info:
            st.info["chosen"] = st.inner.info["chosen"]
        return out

    def _tell(self, candidates: list[Candidate], evaluations: list[Evaluation]) -> None:
        by_stage: dict[int, tuple[_Stage, list, list]] = {}
        for c, e in zip(candidates, evaluations):
            st, ic = self._pending.pop(c.id)
            entry = by_stage.setdefault(id(st), (st, [], []))
            entry[1].append(ic)
            entry[2].append(e)
            self._seen[np.asarray(c.x, dtype=np.float64).tobytes()] = e.loss if e.ok else math.inf
            loss = e.loss if e.ok and math.isfinite(e.loss) else math.inf
            if loss < self._loss:
                self._x, self._loss = np.asarray(c.x, dtype=np.float64).copy(), loss
            if math.isfinite(loss) and (st.info["best_loss"] is None or loss < st.info["best_loss"]):
                st.info["best_loss"] = loss
        for st, ics, evs in by_stage.values():
            if st.inner is not None:
                st.inner.tell(ics, evs)
                st.told += len(ics)

    def _recommend(self) -> np.ndarray:
        return self._x.copy()

    def close(self) -> None:
        for st in self.stages:
            self._finish(st)
