"""One suite over every registered searcher and every registered task.

A new plugin is tested the moment it is installed. Options a plugin needs to be tested quickly go
in the two dicts below; a plugin absent from them runs with its defaults.
"""
from __future__ import annotations

import numpy as np
import pytest

from harness import registry
from harness.api import Candidate, Searcher
from harness.config import RunConfig, resolve_options
from harness.evaluators import reduce_shards
from harness.runner import run

# Searcher options for the 6-D quadratic (paper defaults are tuned for real models).
SEARCHER_OPTIONS: dict[str, dict] = {"gradient": {"lr": 0.05, "validate_every": 25}}
# One small tiny-clip zoo for every zoo task in the suite (built once per test session).
SMALL_ZOO = "datasets=skdigits,lfw;max_n=400;pretrain_steps=40;ft_steps=15"
# Task options that keep each task small in tests (tiny zoo, few samples).
TASK_OPTIONS: dict[str, dict] = {
    "addition": {"source": "tiny-clip", "source_options": SMALL_ZOO, "search_n": 32},
    "negation": {"source": "tiny-clip", "source_options": SMALL_ZOO, "target": "skdigits", "control": "lfw", "search_n": 32},
    "few_shot": {"source": "tiny-clip", "source_options": SMALL_ZOO, "target": "skdigits", "shots": 2},
    # threshold 0 and trusted_fraction 1: on 64 images of the tiny zoo every UFM term is non-zero
    "tta": {"source": "tiny-clip", "source_options": SMALL_ZOO, "target": "skdigits", "max_n": 64, "threshold": 0.0,
            "trusted_fraction": 1.0},
}

SEARCHERS = registry.names("searcher")
TASKS = registry.names("task")


def _run(tmp_path, searcher, seed=0, budget=300, batch=None):
    cfg = RunConfig(task="quadratic", searcher=searcher, budget=budget, batch_size=batch, seed=seed,
                    task_options={"dim": 6}, searcher_options=SEARCHER_OPTIONS.get(searcher, {}),
                    results_dir=str(tmp_path), quiet=True)
    return run(cfg, log=lambda m: None)


@pytest.mark.parametrize("name", SEARCHERS)
def test_searcher_gets_close_to_the_optimum(tmp_path, name):
    cls = registry.load("searcher", name)
    rec = _run(tmp_path, name)
    start = rec["references"]["start (x = 0)"]["loss"]
    if cls.reference:
        assert rec["final"]["loss"] <= start + 1e-12
    else:
        assert rec["final"]["distance"] < 0.15, rec["final"]
        assert rec["final"]["loss"] < 0.05 * start


@pytest.mark.parametrize("name", SEARCHERS)
def test_searcher_respects_budget_and_batch(tmp_path, name):
    cls = registry.load("searcher", name)
    batch = min(4, cls.max_batch or 4)
    budget = 23
    rec = _run(tmp_path, name, budget=budget, batch=batch)
    rows = [r for r in _trace(tmp_path, rec)]
    assert rec["evaluations"] == len(rows) <= budget
    if not cls.reference:
        assert len(rows) == budget
    # The runner never hands the searcher more than the batch size at once: rows come in rounds.
    assert rec["config"]["batch_size"] == batch


def _trace(tmp_path, rec):
    from harness.results import read_jsonl
    from pathlib import Path
    return read_jsonl(Path(tmp_path) / "runs" / rec["run_id"] / "trace.jsonl")


@pytest.mark.parametrize("name", SEARCHERS)
def test_searcher_same_seed_same_result(tmp_path, name):
    a = _run(tmp_path / "a", name, seed=3, budget=60)
    b = _run(tmp_path / "b", name, seed=3, budget=60)
    assert a["final"] == b["final"]
    xa = [r["x"] for r in _trace(tmp_path / "a", a)]
    xb = [r["x"] for r in _trace(tmp_path / "b", b)]
    assert xa == xb


@pytest.mark.parametrize("name", SEARCHERS)
def test_searcher_ask_returns_candidates_in_the_box(name):
    from tasks.quadratic import QuadraticTask
    cls = registry.load("searcher", name)
    task = QuadraticTask(QuadraticTask.Options(dim=5), seed=0)
    task.setup()
    space = task.space()
    s: Searcher = cls(space, 10, 2, 0, resolve_options(cls, SEARCHER_OPTIONS.get(name, {}), "searcher"))
    try:
        cands = s.ask(2)
        assert 1 <= len(cands) <= 2
        for c in cands:
            assert c.x.shape == (5,)
            assert np.all(c.x >= space.lower - 1e-9) and np.all(c.x <= space.upper + 1e-9)
            assert c.grad == cls.needs_gradient or not c.grad
        s.tell(cands, task.evaluate(cands))
        assert s.recommend().shape == (5,)
    finally:
        s.close()


def _task(name, cache_dir, seed=0):
    cls = registry.load("task", name)
    opts = resolve_options(cls, TASK_OPTIONS.get(name, {}), "task")
    task = cls(opts, space="per_block" if name != "quadratic" else "flat", seed=seed, cache_dir=cache_dir)
    task.setup("cpu")
    return task


@pytest.mark.parametrize("name", TASKS)
def test_task_space_and_evaluations(name, cache_dir):
    task = _task(name, cache_dir)
    space = task.space()
    assert space.dim >= 1
    assert np.all(space.lower < space.upper)
    assert np.all(space.start >= space.lower) and np.all(space.start <= space.upper)
    assert space.labels is None or len(space.labels) == space.dim
    rng = np.random.default_rng(0)
    xs = [space.start, rng.uniform(space.lower, space.upper) * 0.3]
    cands = [Candidate(x=x) for x in xs]
    evs = [task.complete(c, e) for c, e in zip(cands, task.evaluate(cands))]
    assert len(evs) == 2 and all(np.isfinite(e.loss) and e.ok for e in evs)
    # Same candidate, same loss: the search objective is deterministic.
    assert task.complete(cands[1], task.evaluate([cands[1]])[0]).loss == pytest.approx(evs[1].loss, rel=1e-6)
    # Shards are disjoint parts whose weighted mean is the whole (for tasks that declare it).
    parts = [task.evaluate([cands[1]], shard=(i, 2))[0] for i in range(2)]
    assert all(np.isfinite(p.loss) for p in parts)
    if type(task).shardable(task.options):
        assert task.complete(cands[1], reduce_shards(parts)).loss == pytest.approx(evs[1].loss, rel=1e-5, abs=1e-6)
    g = task.evaluate([Candidate(x=xs[1], grad=True, batch=0)])[0]
    assert g.grad is not None and g.grad.shape == (space.dim,) and np.all(np.isfinite(g.grad))
    final = task.final(space.start)
    assert task.headline in final and np.isfinite(final[task.headline])
