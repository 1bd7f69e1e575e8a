"""The bagging searcher (searchers/bagging.py): nevergrad rounds on resampled fixed mini-batches,
round optima averaged; budget split, batches, chaining, the final whole-set score, options."""
from __future__ import annotations

import numpy as np
import pytest

from harness import registry
from harness.api import HarnessError
from harness.config import resolve_options
from harness.conformance import drive as drive_searcher
from atlas_harness_searchers.bagging import Bagging
from atlas_harness_tasks.quadratic import QuadraticTask


def quadratic(dim=5, seed=0, noise=0.0):
    t = QuadraticTask(QuadraticTask.Options(dim=dim, noise=noise), seed=seed)
    t.setup()
    return t


def drive(task, budget, seed=0, batch=1, **kw):
    s = Bagging(task.space(), budget, batch, seed, resolve_options(Bagging, kw, "searcher"))
    asked, x = drive_searcher(s, task.evaluate, budget, batch)
    return s, [c for cands in asked for c in cands], x


def test_rounds_split_the_budget_one_fixed_batch_each_and_a_final_whole_set_score():
    t = quadratic()
    s, asked, x = drive(t, 83, rounds=4, batch=3, chain=False)
    assert len(asked) == 83
    assert s.budgets == [20, 20, 20, 22]                 # the remainder goes to the last round
    seen = [c.batch for c in asked[:-1]]
    runs = [seen[0:20], seen[20:40], seen[40:60], seen[60:82]]
    assert [len(set(r)) for r in runs] == [1, 1, 1, 1]   # one fixed mini-batch per round
    assert len({r[0] for r in runs}) == 4                # and a different one each round
    assert all(b is not None for b in seen)
    assert asked[-1].batch is None                       # the mean scored on the whole search set
    np.testing.assert_allclose(asked[-1].x, np.mean(s.optima, axis=0))
    np.testing.assert_allclose(x, asked[-1].x)
    assert len(s.info["rounds"]) == 4 and all(r["best_loss"] is not None for r in s.info["rounds"])


def test_each_round_optimum_is_its_best_mini_batch_point():
    t = quadratic(noise=0.05)
    s, asked, _ = drive(t, 41, rounds=2, chain=False)
    losses = t.evaluate(asked[:-1])
    for r, (lo, hi) in enumerate([(0, 20), (20, 40)]):
        best = lo + int(np.argmin([e.loss for e in losses[lo:hi]]))
        np.testing.assert_allclose(s.optima[r], asked[best].x)


def test_chain_starts_each_round_at_the_mean_of_the_optima_so_far():
    t = quadratic()
    s, asked, _ = drive(t, 61, rounds=3, chain=True)
    # NGOpt/Cobyla's first proposal is its start.
    np.testing.assert_allclose(asked[0].x, t.space().start)
    np.testing.assert_allclose(asked[20].x, s.optima[0])
    np.testing.assert_allclose(asked[40].x, np.mean(s.optima[:2], axis=0))


def test_bagging_gets_close_to_a_noisy_quadratics_optimum_and_is_deterministic():
    """With mini-batch noise (a constant per batch seed on this task) the rounds still converge and
    their mean lands well inside half the start's distance to the optimum; same seed, same run."""
    for seed in (0, 1):
        t = quadratic(noise=0.05, seed=seed)
        _, a, x = drive(t, 201, seed=seed, rounds=4, chain=True)
        start = t.final(t.space().start)["distance"]
        assert t.final(x)["distance"] < 0.5 * start
        _, b, y = drive(quadratic(noise=0.05, seed=seed), 201, seed=seed, rounds=4, chain=True)
        np.testing.assert_array_equal(x, y)
        assert [c.batch for c in a] == [c.batch for c in b]


def test_combine_best_scores_every_optimum_and_the_mean_and_recommends_the_lowest():
    t = quadratic(noise=0.05)
    s, asked, x = drive(t, 60, rounds=3, combine="best")
    assert s._final_asked == 4                           # handed out one per ask at batch 1
    final = asked[-4:]
    assert [c.batch for c in final] == [None] * 4
    losses = [e.loss for e in t.evaluate(final)]
    np.testing.assert_allclose(x, final[int(np.argmin(losses))].x)


def test_combine_best_never_asks_more_than_the_batch():
    t = quadratic()
    s = Bagging(t.space(), 60, 2, 0, resolve_options(Bagging, {"rounds": 3, "combine": "best"}, "searcher"))
    asked, _ = drive_searcher(s, t.evaluate, 60, 2)
    assert sum(map(len, asked)) == 60 and max(map(len, asked)) <= 2
    assert [c.batch for c in asked[-2] + asked[-1]] == [None] * 4


def test_bad_options_get_one_line_errors():
    t = quadratic()
    with pytest.raises(HarnessError, match="at least 2 evaluations per round.*raise --budget to 9"):
        drive(t, 8, rounds=4)
    # Declared choices and bounds are checked by the registry, before the searcher is built.
    with pytest.raises(HarnessError, match="combine='median' is not one of mean, best"):
        registry.validate("searcher", Bagging, resolve_options(Bagging, {"combine": "median"}, "searcher"))
    with pytest.raises(HarnessError, match="rounds must be >= 1, got 0"):
        registry.validate("searcher", Bagging, resolve_options(Bagging, {"rounds": 0}, "searcher"))
    with pytest.raises(HarnessError, match="unknown nevergrad optimizer"):
        drive(t, 50, optimizer="Cobila")


def test_independent_rounds_all_start_at_the_spaces_start():
    t = quadratic()
    s, asked, _ = drive(t, 61, rounds=3, chain=False)
    for i in (0, 20, 40):
        np.testing.assert_allclose(asked[i].x, t.space().start)
    assert Bagging.default_budget == 1201 and Bagging.Options().chain is True
