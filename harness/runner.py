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
import sys
import time
import traceback

import numpy as np
import torch

import harness.registry as registry
import harness.sources.task_check as task_check
from harness.api import HarnessError, Task
from harness.errors import SetupRefusal
from harness.config import RunConfig
from harness.evaluators import Evaluator, LocalEvaluator
from harness.loop import Progress, check_losses, progress_bar, search, search_async
from harness.problem import Plan, build_task, make_searcher, plan
from harness.provenance import git_sha, now, peak_rss_mb, reset_peak_rss, versions
from harness.results import RunRecord, RunStore
from harness.signals import close_all, sigint_deferred, stop_signals_exit

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
    before = _snapshot(store)
    store.lock()  # one process per run folder; released when this one ends or dies
    refused = False
    try:
        old = store.record()
        if old and old.get("status") == "complete" and not c.rerun:
            log(f"run {store.run_id} is already complete (use --rerun to run it again)")
            return old
        if c.rerun:
            store.clear()
        store.open()
        with stop_signals_exit():
            return _execute(p, store, log)
    except (task_check.CheckpointMismatch, SetupRefusal):  # nothing of a refused run is kept
        refused = True
        raise
    finally:
        store.close()
        if refused:
            _restore(store, before)


def _check_resume(store: RunStore, c: RunConfig) -> None:
    """``--resume ID`` continues only an existing run whose recorded config is this one."""
    old = store.record()
    if old is None and not store.trace_path.exists():
        raise HarnessError(f"no run '{store.run_id}' under {store.dir.parent}; --resume continues a recorded "
                           "run (the same command without --resume starts or resumes its own)")
    recorded = store.recorded_config()
    if recorded is None and c.run_id() != store.run_id:
        # (a run id names its settings' hash: one that matches proves the settings)
        raise HarnessError(f"run {store.run_id} has no readable record.json or config.json, so the settings it "
                           "ran with are unknown; resume it with its own command (its id must match), or start a "
                           "new run without --resume")
    if recorded is not None:
        mine = c.identity()
        theirs = {k: v for k, v in recorded.items() if k in mine}
        diff = sorted(k for k in mine if json.dumps(mine[k], sort_keys=True, default=str)
                      != json.dumps(theirs.get(k), sort_keys=True, default=str))
        if diff:
            raise HarnessError(f"run {store.run_id} was recorded with a different config ({', '.join(diff)} "
                               "differ); resume it with its own command, or start a new run without --resume")


def _execute(p: Plan, store: RunStore, log) -> dict:
    """One run from its first record to its last: the record is written before anything is
    built, the setup's facts and the search's results are added to it, and however the run ends
    its final status is written before the searcher and the evaluator are closed."""
    prior = store.trace_rows()
    record = _new_record(p, store, len(prior))
    if prior:
        log(f"resuming run {store.run_id} from {len(prior)} recorded evaluations")
    reset_peak_rss()
    t0 = time.time()
    task = evaluator = searcher = None
    try:
        task, setup_info = build_task(p)
        record.update(**setup_info)
        _record_setup(record, p, task)
        _check_checkpoints(record, task, log)
        searcher = make_searcher(p, task.space())
        if not searcher.reproducible:
            why = searcher.info.get("why_not", "its proposals do not follow the run's seed")
            if prior:
                raise HarnessError(f"run {store.run_id} cannot resume: {why}, so its {len(prior)} recorded evaluations "
                                   "cannot be replayed; --rerun starts it over (a seeded optimiser such as "
                                   "-s optimizer=CMA can be resumed)")
            log(f"note: this run is not reproducible from its seed ({why}); a killed run cannot resume")
        evaluator = make_evaluator(p, task)
        record.evaluator = evaluator.describe()
        if prior:
            check_losses(task, prior)
        state = _search_loop(p, store, record, searcher, evaluator, prior, t0)
        _record_result(record, p, store, task, searcher, state)
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
        _write_final(record, store, t0, searcher, evaluator)
    return record.to_dict()


def _new_record(p: Plan, store: RunStore, resumed_from: int) -> RunRecord:
    """The run's record as it starts (status ``running``), written with the config before anything is built."""
    c = p.config
    record = RunRecord(
        run_id=store.run_id, task=c.task, searcher=c.searcher, seed=c.seed, key=c.key(), config=dataclasses.asdict(c),
        budget=c.budget, headline=p.task_cls.headline, higher_is_better=p.task_cls.higher_is_better,
        created=now(), git_sha=git_sha(), versions=versions(), host=os.uname().nodename,
        evaluations=resumed_from, resumed_from=resumed_from)
    store.write_config(record.config)
    store.write_record(record)
    return record


def _record_setup(record: RunRecord, p: Plan, task: Task) -> None:
    """What the built task reports about itself: plugins and checkpoint family, the data the search
    touched, and the facts of its setup (caches hit, inputs held in memory or streamed)."""
    c = p.config
    record.plugins = {"searcher": registry.provenance("searcher", c.searcher),
                      "task": registry.provenance("task", c.task)}
    extra = task.provenance()
    record.plugins.update({k: v for k, v in extra.items() if k != "family"})
    record.family = extra.get("family")
    record.data_touched = task.data_touched(p.searcher_cls.uses_scores)
    record.update(learnable_parameters=task.learnable_parameters(p.searcher_cls.uses_scores))
    record.update(**task.setup_facts())


def _check_checkpoints(record: RunRecord, task: Task, log) -> None:
    """Judge the checkpoint check a source built from the user's checkpoints carries
    (:mod:`harness.sources.task_check`): a checkpoint that does not beat the pre-trained model on
    its own data set stops the run here, before any search, unless the checkpoints are trusted;
    warnings are logged. What was decided goes into the record."""
    table = task_check.table_of(getattr(task, "source", None))
    if table is not None:
        record.update(checkpoint_check=task_check.enforce(task_check.judge(table), log))


# The files of a run folder a refused run puts back as they were (it writes only these).
_RUN_FILES = ("config.json", "record.json", "trace.jsonl", "coefficients.safetensors")


def _snapshot(store: RunStore) -> dict | None:
    """The run folder's files before this process touches it (None: there is no folder yet)."""
    if not store.dir.exists():
        return None
    return {name: (store.dir / name).read_bytes() for name in _RUN_FILES if (store.dir / name).is_file()}


def _restore(store: RunStore, before: dict | None) -> None:
    """Leave nothing recorded by a run the checkpoint check refused: remove the run folder it
    created (and the ``runs`` folder when that is left empty), or put back the files of one that
    was there before (``--rerun`` and a resume write them before the check runs)."""
    import shutil
    if before is None:
        shutil.rmtree(store.dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            store.dir.parent.rmdir()  # only when empty
        return
    for name in _RUN_FILES:
        path = store.dir / name
        if name in before:
            path.write_bytes(before[name])
        else:
            path.unlink(missing_ok=True)


def _search_loop(p: Plan, store: RunStore, record: RunRecord, searcher, evaluator: Evaluator, prior, t0: float) -> Progress:
    """Run the search (replaying ``prior`` first); record the setup time and the evaluator's statistics."""
    c = p.config
    t_search = time.time()
    record.update(setup_s=round(t_search - t0, 2))  # process work before the first evaluation
    bar = None if c.quiet else progress_bar(c)
    state = Progress(store, bar, float(prior[-1].t) if prior else 0.0, t_search)
    (search_async if c.parallel == "async" else search)(c, searcher, evaluator, prior, state)
    search_s = time.time() - t_search
    stats = getattr(evaluator, "stats", None)
    if stats is not None:  # Ray: where the time went, and the workers' utilisation over the search
        st = stats()
        busy = st["worker_s"] / max(search_s * max(st["workers"], 1), 1e-9)
        record.evaluator = {**record.evaluator, "stats": {**st, "search_s": round(search_s, 3),
                                                          "utilisation": round(busy, 4)}}
    if bar is not None:
        bar.close()
    return state


def _record_result(record: RunRecord, p: Plan, store: RunStore, task: Task, searcher, state: Progress) -> None:
    """Score the recommendation on the held-out split and record it as complete; refuse a wrong
    result (nothing scored, metrics that are not numbers) instead of recording it."""
    x = np.asarray(searcher.recommend(), dtype=np.float64)
    record.final = task.final(x)
    record.constraint_ok = bool(task.constraint_ok(record.final))
    record.coefficients = store.save_coefficients(x, task.expand(x))
    record.task_vectors = task.task_vector_names()
    used, failed, best = state.used, state.failed, state.best
    record.update(status="complete", evaluations=used, failed_evaluations=failed,
                  best_search_loss=best if math.isfinite(best) else None,
                  searcher_info=searcher.info, references=_references(task, p, record))
    if task.task_info:
        record.task_info = task.task_info
    if used and failed == used:
        raise HarnessError(f"all {used} evaluations failed ({_first_error(store)}); nothing to report")
    bad = [k for k, v in record.final.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise HarnessError(f"the final metrics are not finite ({', '.join(bad)}); the run is not reported")


def _write_final(record: RunRecord, store: RunStore, t0: float, searcher, evaluator) -> None:
    """The record is written first, with Ctrl-C held off, so a second Ctrl-C cannot leave it
    "running"; then the searcher and evaluator are closed, also with Ctrl-C held off (a Ray
    interrupted half way through its shutdown ends the process with status 1), unless the user
    presses it twice more."""
    with sigint_deferred() as held:
        if record.status == "running":  # left by an exception raised in an except clause
            record.update(status="interrupted", error=INTERRUPTED)
        if record.status != "complete":  # the record counts what the trace holds
            rows = store.trace(warn=False)
            record.update(evaluations=len(rows), failed_evaluations=sum(not r.get("ok", True) for r in rows))
        record.update(finished=now(), wall_time_s=time.time() - t0, peak_rss_mb=peak_rss_mb())
        try:
            store.write_record(record)
        except HarnessError as e:
            print(f"warning: {e}", file=sys.stderr)
    with sigint_deferred(held, give_in=2):
        close_all(searcher, evaluator)
    held.resend()


INTERRUPTED = "interrupted by the user; run the same command to resume"


def _references(task, p, record) -> dict:
    """The task's references, from the reference cache when this content was scored before
    (``harness/refcache.py``); tasks that compose no checkpoints are not cached (nothing to key)."""
    if not record.family:
        return task.references()
    import harness.refcache as refcache
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


