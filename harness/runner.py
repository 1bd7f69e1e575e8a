"""The search loop: ask → evaluate → record → tell, until the budget of evaluations is spent.

A run with a trace on disk (killed, interrupted, failed) is resumed by replaying that trace:
the searcher is rebuilt with the same seed, and every candidate it asks for again is answered
from the trace instead of being re-evaluated, so nothing is lost or counted twice and the final
result equals that of an uninterrupted run.

However a run ends (complete, failed, Ctrl-C, a second Ctrl-C while the workers shut down, a
``SystemExit``), its record is rewritten with a final status and with the evaluations its trace
holds, before the searcher and the evaluator are closed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque

import numpy as np
import torch

from harness import registry
from harness.api import Candidate, Evaluation, HarnessError, Task
from harness.config import RunConfig
from harness.evaluators import Evaluator, LocalEvaluator
from harness.problem import Plan, build_task, make_searcher, plan
from harness.results import RunRecord, RunStore, TraceRow, git_sha, now, peak_rss_mb, reset_peak_rss, versions

# The most candidates one ask may take (``--batch-size``): beyond it a searcher's per-batch state
# (nevergrad's population, one slot per worker) only costs memory and time, and at 10**20 it never
# finishes setting up.
MAX_BATCH = 10_000


def make_evaluator(p: Plan, task: Task) -> Evaluator:
    c = p.config
    if c.workers == 0 and not c.address:
        return LocalEvaluator(task)
    from harness.ray_evaluator import RayEvaluator
    return RayEvaluator(p, workers=c.workers, address=c.address, cpus_per_worker=c.cpus_per_worker,
                        gpus_per_worker=c.gpus_per_worker, mode=c.parallel, quiet=c.quiet, task=task)


class _Replay:
    """Answers candidates from an earlier trace, in order, while they match it exactly."""

    def __init__(self, rows: list[TraceRow]):
        self.rows, self.pos = rows, 0

    def take(self, c: Candidate) -> tuple[Evaluation, float] | None:
        if self.pos >= len(self.rows):
            return None
        row = self.rows[self.pos]
        if not np.array_equal(row.x, np.asarray(c.x, dtype=np.float64)):
            raise HarnessError(f"the trace does not match the searcher's proposal at evaluation {self.pos + 1} "
                               "(config or code changed since the run started); use --rerun to start it over")
        self.pos += 1
        return self.evaluation(row), float(row.t)

    @staticmethod
    def evaluation(row: TraceRow) -> Evaluation:
        """The evaluation a trace row recorded."""
        loss = row.loss if row.loss is not None else float("nan")
        return Evaluation(loss=loss, grad=row.grad, metrics=row.metrics, weight=row.weight, ok=row.ok, error=row.error)


def run(cfg: RunConfig, log=print) -> dict:
    """Execute (or resume) one run and return its run record."""
    p = plan(cfg)
    c = p.config
    if c.batch_size > MAX_BATCH:
        raise HarnessError(f"--batch-size must be between 1 and {MAX_BATCH} (candidates asked per round), "
                           f"got {c.batch_size}")
    if c.address:  # an unreachable cluster is one line now, before anything is recorded
        from harness.ray_evaluator import check_reachable
        check_reachable(c.address)
    store = RunStore(c.results_dir, c.resume or c.run_id())
    if c.resume:
        _check_resume(store, c)
    store.lock()  # one process per run folder; released when this one ends or dies
    try:
        old = store.record()
        if old and old.get("status") == "complete" and not c.rerun:
            log(f"run {store.run_id} is already complete (use --rerun to run it again)")
            return old
        if c.rerun:
            store.clear()
        store.open()
        with _stop_signals_exit():
            return _execute(p, store, log)
    finally:
        store.close()


@contextlib.contextmanager
def _stop_signals_exit():
    """While the block runs, SIGTERM and SIGHUP (``kill``, a closed terminal) raise
    ``SystemExit(128 + signal)`` instead of ending the process on the spot, so the run record is
    written (``interrupted``) and a local Ray is shut down. Signals whose handler is not the
    default one are left alone, as is everything outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    saved = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            if signal.getsignal(sig) is signal.SIG_DFL:
                saved[sig] = signal.signal(sig, stop)
        except (ValueError, OSError):
            pass
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _check_resume(store: RunStore, c: RunConfig) -> None:
    """``--resume ID`` continues only an existing run whose recorded config is this one."""
    old = store.record()
    if old is None and not store.trace_path.exists():
        raise HarnessError(f"no run '{store.run_id}' under {store.dir.parent}; --resume continues a recorded "
                           "run (the same command without --resume starts or resumes its own)")
    recorded = (old or {}).get("config")
    if recorded is not None:
        mine = c.identity()
        theirs = {k: v for k, v in recorded.items() if k in mine}
        diff = sorted(k for k in mine if json.dumps(mine[k], sort_keys=True, default=str)
                      != json.dumps(theirs.get(k), sort_keys=True, default=str))
        if diff:
            raise HarnessError(f"run {store.run_id} was recorded with a different config ({', '.join(diff)} "
                               "differ); resume it with its own command, or start a new run without --resume")


def _execute(p: Plan, store: RunStore, log) -> dict:
    c = p.config
    prior = store.trace_rows()
    record = RunRecord(
        run_id=store.run_id, task=c.task, searcher=c.searcher, seed=c.seed, key=c.key(), config=dataclasses.asdict(c),
        budget=c.budget, headline=p.task_cls.headline, higher_is_better=p.task_cls.higher_is_better,
        created=now(), git_sha=git_sha(), versions=versions(), host=os.uname().nodename,
        evaluations=len(prior), resumed_from=len(prior))
    store.write_config(record.config)
    store.write_record(record)
    if prior:
        log(f"resuming run {store.run_id} from {len(prior)} recorded evaluations")
    reset_peak_rss()
    t0 = time.time()
    task = evaluator = searcher = None
    try:
        task, setup_info = build_task(p)
        record.update(**setup_info)
        record.plugins = {"searcher": registry.provenance("searcher", c.searcher),
                          "task": registry.provenance("task", c.task)}
        extra = task.provenance() if hasattr(task, "provenance") else {}
        record.plugins.update({k: v for k, v in extra.items() if k != "family"})
        record.family = extra.get("family")
        record.data_touched = p.task_cls.data_for(p.task_options) if p.searcher_cls.uses_scores else "none"
        meta = getattr(getattr(task, "source", None), "meta", None) or {}
        if "references_cached" in meta:  # the source's zero-shot/fine-tuned accuracies came from the cache
            record.update(source_references_cached=meta["references_cached"])
        if "heads_cached" in meta:  # the zero-shot heads (text tower) came from the cache
            record.update(heads_cached=meta["heads_cached"])
        if "resident_inputs_mb" in meta:  # what the source holds in memory as inputs, and how
            record.update(resident_inputs_mb=meta["resident_inputs_mb"], input_dtype=meta.get("input_dtype"))
            if meta.get("streamed_splits"):  # read from disk in batches when scored, never all in memory
                record.update(streamed_splits=meta["streamed_splits"], streamed_inputs_mb=meta["streamed_inputs_mb"])
        space = task.space()
        searcher = make_searcher(p, space)
        evaluator = make_evaluator(p, task)
        record.evaluator = evaluator.describe()
        if prior:
            _check_losses(task, prior)
        t_search = time.time()
        record.update(setup_s=round(t_search - t0, 2))  # process work before the first evaluation
        wall_offset = float(prior[-1].t) if prior else 0.0
        bar = _progress(c, p)
        state = _Progress(store, bar, wall_offset, t_search)
        if c.parallel == "async":
            _search_async(c, searcher, evaluator, prior, state)
        else:
            _search(c, searcher, evaluator, prior, state)
        used, failed, best = state.used, state.failed, state.best
        search_s = time.time() - t_search
        stats = getattr(evaluator, "stats", None)
        if stats is not None:  # Ray: where the time went, and the workers' utilisation over the search
            st = stats()
            busy = st["worker_s"] / max(search_s * max(st["workers"], 1), 1e-9)
            record.evaluator = {**record.evaluator, "stats": {**st, "search_s": round(search_s, 3),
                                                              "utilisation": round(busy, 4)}}
        if bar is not None:
            bar.close()
        x = np.asarray(searcher.recommend(), dtype=np.float64)
        record.final = task.final(x)
        record.constraint_ok = bool(task.constraint_ok(record.final))
        expand = getattr(task, "expand", None)
        record.coefficients = store.save_coefficients(x, expand(x) if expand else None)
        comp = getattr(task, "comp", None)
        record.task_vectors = list(comp.task_names) if comp is not None else None
        record.update(status="complete", evaluations=used, failed_evaluations=failed,
                      best_search_loss=best if math.isfinite(best) else None,
                      searcher_info=searcher.info, references=_references(task, p, record))
        if getattr(task, "task_info", None):
            record.task_info = task.task_info
        # A wrong result is never recorded as complete: nothing scored, or metrics that are not numbers.
        if used and failed == used:
            raise HarnessError(f"all {used} evaluations failed ({_first_error(store)}); nothing to report")
        bad = [k for k, v in record.final.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise HarnessError(f"the final metrics are not finite ({', '.join(bad)}); the run is not reported")
    except KeyboardInterrupt:
        record.update(status="interrupted", error=INTERRUPTED)
        raise
    except HarnessError as e:
        record.update(status="failed", error=str(e))
        raise
    except Exception as e:
        record.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        raise
    except BaseException as e:  # SystemExit (Ray turns SIGTERM into one), GeneratorExit
        record.update(status="interrupted", error=f"stopped ({type(e).__name__}); run the same command to resume")
        raise
    finally:
        # The record is written first, with Ctrl-C held off, so a second Ctrl-C cannot leave it
        # "running"; then the searcher and evaluator are closed, also with Ctrl-C held off (a Ray
        # interrupted half way through its shutdown ends the process with status 1), unless the
        # user presses it twice more.
        with _sigint_deferred() as held:
            if record.status == "running":  # left by an exception raised in an except clause above
                record.update(status="interrupted", error=INTERRUPTED)
            if record.status != "complete":  # the record counts what the trace holds
                rows = store.trace(warn=False)
                record.update(evaluations=len(rows), failed_evaluations=sum(not r.get("ok", True) for r in rows))
            record.update(finished=now(), wall_time_s=time.time() - t0, peak_rss_mb=peak_rss_mb())
            try:
                store.write_record(record)
            except HarnessError as e:
                print(f"warning: {e}", file=sys.stderr)
        with _sigint_deferred(held, give_in=2):
            _close(searcher, evaluator)
        held.resend()
    return record.to_dict()


INTERRUPTED = "interrupted by the user; run the same command to resume"


class _HeldSigint:
    """The Ctrl-Cs :func:`_sigint_deferred` held off, and the handler they were meant for."""

    def __init__(self):
        self.got, self.handler = 0, None

    def resend(self) -> None:
        """Deliver a held Ctrl-C to the handler it was meant for (Python's raises KeyboardInterrupt)."""
        if self.got and callable(self.handler):
            self.got = 0
            self.handler(signal.SIGINT, None)


@contextlib.contextmanager
def _sigint_deferred(held: _HeldSigint | None = None, give_in: int | None = None):
    """Hold SIGINT (Ctrl-C) off while the block runs; yields a :class:`_HeldSigint` (``held``, or a
    new one) whose ``resend()`` delivers one that came meanwhile. With ``give_in``, that many
    Ctrl-Cs during the block raise KeyboardInterrupt at once. Outside the main thread (where no
    handler can be set) it holds nothing off."""
    held = held if held is not None else _HeldSigint()
    if threading.current_thread() is not threading.main_thread():
        yield held
        return
    start = held.got

    def hold(signum, frame):
        held.got += 1
        if give_in is not None and held.got - start >= give_in:
            held.got = 0
            raise KeyboardInterrupt

    try:
        before = signal.signal(signal.SIGINT, hold)
    except (ValueError, OSError):
        yield held
        return
    if held.handler is None:
        held.handler = before
    try:
        yield held
    finally:
        signal.signal(signal.SIGINT, before)


def _close(*parts) -> None:
    """Close the searcher and the evaluator. Each is closed even when closing the other fails or
    is interrupted; a failure is one warning line, a Ctrl-C is raised once both are done."""
    interrupted = False
    for part in parts:
        if part is None:
            continue
        try:
            part.close()
        except KeyboardInterrupt:
            interrupted = True
        except Exception as e:
            print(f"warning: closing the {type(part).__name__} failed: {type(e).__name__}: {e}", file=sys.stderr)
    if interrupted:
        raise KeyboardInterrupt


class _Progress:
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


def _search(c: RunConfig, searcher, evaluator: Evaluator, prior: list[TraceRow], state: _Progress) -> None:
    """Batch by batch: ask ``--batch-size`` candidates, score them together, tell them together."""
    replay = _Replay(prior)
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
        for i, (cand, ev) in enumerate(zip(cands, evals)):
            state.count(cand, ev, i in fresh)
        searcher.tell(cands, evals)
        state.tick(len(cands))


def _search_async(c: RunConfig, searcher, evaluator: Evaluator, prior: list[TraceRow], state: _Progress) -> None:
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
                raise HarnessError(f"the trace does not match the searcher's proposals at evaluation {state.used + 1} "
                                   "(config or code changed since the run started); use --rerun to start it over")
            # By identity: candidates hold arrays, so ``==`` (and list.remove) cannot compare them.
            unsent = [u for u in unsent if u is not cand]
            ev, fresh = _Replay.evaluation(row), False
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


def _check_losses(task, prior: list[TraceRow]) -> None:
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


def _references(task, p, record) -> dict:
    """The task's references, from the reference cache when this content was scored before
    (``harness/refcache.py``); tasks that compose no checkpoints are not cached (nothing to key)."""
    if not record.family:
        return task.references()
    from harness import refcache
    from harness.sources.cache import cache_root
    c = p.config
    material = {"task": c.task, "options": c.task_options, "space": c.space, "seed": c.seed,
                "family": record.family, "device": str(torch.device(c.device).type),
                "code": refcache.code_version(p.task_cls)}
    refs, hit = refcache.cached(cache_root(c.cache_dir), "task", material, task.references)
    record.update(references_cached=hit)
    return refs


def _first_error(store: RunStore) -> str:
    row = next((r for r in store.trace(warn=False) if r.get("error")), None)
    return row["error"] if row else "non-finite losses"


def _progress(c: RunConfig, p: Plan):
    if c.quiet:
        return None
    from tqdm import tqdm
    return tqdm(total=c.budget, desc=f"{c.searcher} on {c.task}", unit="eval", file=sys.stderr,
                dynamic_ncols=True, leave=True)
