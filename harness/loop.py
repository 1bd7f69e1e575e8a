"""The search loop: ask → evaluate → record → tell, batch by batch or pipelined, with the replay
of a recorded trace that makes a resumed run equal an uninterrupted one."""
from __future__ import annotations

import math
import sys
import time
from collections import deque

import numpy as np

from harness.api import Candidate, Evaluation, HarnessError
from harness.config import RunConfig
from harness.evaluators import Evaluator, LocalEvaluator
from harness.results import RunStore, TraceRow


def mismatch(searcher, at: int) -> HarnessError:
    """The error for a resumed run whose searcher proposes something else than its trace recorded."""
    if not getattr(searcher, "reproducible", True):
        why = searcher.info.get("why_not", "its proposals do not follow the run's seed")
        return HarnessError(f"the run cannot resume: {why}, so its recorded evaluations cannot be replayed "
                            f"(evaluation {at} differs); --rerun starts it over")
    return HarnessError(f"the trace does not match the searcher's proposal at evaluation {at} "
                        "(config or code changed since the run started); use --rerun to start it over")


class Replay:
    """Answers candidates from an earlier trace, in order, while they match it exactly."""

    def __init__(self, rows: list[TraceRow], searcher=None):
        self.rows, self.pos, self.searcher = rows, 0, searcher

    def take(self, c: Candidate) -> tuple[Evaluation, float] | None:
        if self.pos >= len(self.rows):
            return None
        row = self.rows[self.pos]
        if not np.array_equal(row.x, np.asarray(c.x, dtype=np.float64)):
            raise mismatch(self.searcher, self.pos + 1)
        self.pos += 1
        return self.evaluation(row), float(row.t)

    @staticmethod
    def evaluation(row: TraceRow) -> Evaluation:
        """The evaluation a trace row recorded."""
        loss = row.loss if row.loss is not None else float("nan")
        return Evaluation(loss=loss, grad=row.grad, metrics=row.metrics, weight=row.weight, ok=row.ok, error=row.error)


class Progress:
    """What the search loop has spent and found, and how each evaluation is written down."""

    def __init__(self, store: RunStore, bar, wall_offset: float, t_search: float):
        self.store, self.bar, self.wall_offset, self.t_search = store, bar, wall_offset, t_search
        self.used, self.failed, self.best = 0, 0, math.inf

    def replayed(self, t: float) -> None:
        """A replayed evaluation took the run's clock to ``t`` (its recorded time)."""
        self.wall_offset, self.t_search = t, time.time()

    def count(self, cand: Candidate, ev: Evaluation, fresh: bool, cand_id: int | None = None) -> None:
        """Count one evaluation; append it to the trace when it was computed now (not replayed)."""
        self.used += 1
        self.failed += not ev.ok
        if ev.ok and cand.batch is None and cand.fidelity >= 1.0:
            self.best = min(self.best, ev.loss)
        if fresh:
            best = self.best if math.isfinite(self.best) else None
            self.store.append(TraceRow(i=self.used, x=np.asarray(cand.x, dtype=np.float64), loss=ev.loss,
                                       grad=ev.grad, ok=ev.ok, error=ev.error, metrics=ev.metrics,
                                       weight=ev.weight, want_grad=cand.grad, batch=cand.batch,
                                       fidelity=cand.fidelity, best=best, cand=cand_id,
                                       t=self.wall_offset + time.time() - self.t_search))

    def tick(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if math.isfinite(self.best):
                self.bar.set_postfix(best=f"{self.best:.4f}", refresh=False)


def search(c: RunConfig, searcher, evaluator: Evaluator, prior: list[TraceRow], state: Progress) -> None:
    """Batch by batch: ask ``--batch-size`` candidates, score them together, tell them together."""
    replay = Replay(prior, searcher)
    while state.used < c.budget:
        cands = searcher.ask(min(c.batch_size, c.budget - state.used))[: c.budget - state.used]
        if not cands:
            break
        evals: list[Evaluation | None] = [None] * len(cands)
        fresh = []
        for i, cand in enumerate(cands):
            hit = replay.take(cand)
            if hit:
                evals[i] = hit[0]
                state.replayed(hit[1])
            else:
                fresh.append(i)
        if fresh:
            for i, ev in zip(fresh, evaluator.evaluate([cands[i] for i in fresh])):
                evals[i] = ev
        # A trace keeps losses, not outputs: replayed candidates that asked for them are scored again
        # (same model, same outputs) so that the searcher is told exactly what it was told before.
        again = [i for i, cand in enumerate(cands) if cand.outputs and i not in fresh and evals[i].ok]
        if again:
            for i, ev in zip(again, evaluator.evaluate([cands[i] for i in again])):
                evals[i].outputs = ev.outputs
        for i, (cand, ev) in enumerate(zip(cands, evals)):
            state.count(cand, ev, i in fresh)
        searcher.tell(cands, evals)
        state.tick(len(cands))


def search_async(c: RunConfig, searcher, evaluator: Evaluator, prior: list[TraceRow], state: Progress) -> None:
    """Pipelined (``--parallel async``): ``--batch-size`` candidates are kept in flight; each score
    is told as soon as it is in, and the searcher's next candidate goes to the freed worker.

    The trace is in the order scores came in, each row naming its candidate (``cand``, the id the
    searcher gave it). A resumed run replays that order exactly (asks as many, tells the recorded
    candidate next), so the searcher is back in the state it had; the candidates that were in
    flight when the run stopped are scored again."""
    rows = deque(prior)
    outstanding: dict[int, Candidate] = {}   # asked, not yet told
    unsent: list[Candidate] = []              # asked, not yet handed to the evaluator
    scored: deque = deque()                   # (candidate, evaluation) collected, not yet told
    asked = 0
    while state.used < c.budget:
        # One score is told per turn, and the searcher is asked to refill before every turn, so a
        # resumed run that replays the recorded order goes through exactly the same asks and tells.
        while len(outstanding) < c.batch_size and asked < c.budget:
            new = searcher.ask(1)[:1]
            if not new:
                break
            for cand in new:
                outstanding[cand.id] = cand
                unsent.append(cand)
                asked += 1
        if not outstanding:
            break
        if rows:
            row = rows.popleft()
            cand = outstanding.get(row.cand) if row.cand is not None else None
            if cand is None or not np.array_equal(row.x, np.asarray(cand.x, dtype=np.float64)):
                raise mismatch(searcher, state.used + 1)
            # By identity: candidates hold arrays, so ``==`` (and list.remove) cannot compare them.
            unsent = [u for u in unsent if u is not cand]
            ev, fresh = Replay.evaluation(row), False
            state.replayed(float(row.t))
        else:
            if unsent:
                evaluator.submit(unsent)
                unsent = []
            if not scored:
                scored.extend(evaluator.collect())
            cand, ev = scored.popleft()
            fresh = True
        del outstanding[cand.id]
        state.count(cand, ev, fresh, cand_id=cand.id)
        searcher.tell([cand], [ev])
        state.tick(1)


def check_losses(task, prior: list[TraceRow]) -> None:
    """Re-score the first recorded whole-set evaluation: a resumed run must be scoring the same
    task it started on, also where its searcher's proposals do not depend on the losses."""
    row = next((r for r in prior if r.ok and r.batch is None and r.fidelity >= 1 and not r.want_grad
                and r.loss is not None), None)
    if row is None:
        return
    cand = Candidate(x=row.x)
    now_loss = LocalEvaluator(task).evaluate([cand])[0].loss
    if not math.isclose(now_loss, row.loss, rel_tol=1e-5, abs_tol=1e-9):
        raise HarnessError(f"the task's losses changed since this run started (evaluation {row.i}: recorded "
                           f"{row.loss:.6g}, now {now_loss:.6g}); use --rerun to start it over")


def progress_bar(c: RunConfig):
    if c.quiet:
        return None
    from tqdm import tqdm
    return tqdm(total=c.budget, desc=f"{c.searcher} on {c.task}", unit="eval", file=sys.stderr,
                dynamic_ncols=True, leave=True)
