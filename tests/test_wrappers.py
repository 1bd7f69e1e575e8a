"""The searcher template (ids, best-so-far, validation once) and the wrappers any searcher can use."""
from __future__ import annotations

import json

import numpy as np
import pytest

from harness import registry
from harness.api import Candidate, Evaluation, HarnessError, Searcher, Space
from harness.config import RunConfig
from harness.problem import plan
from harness.runner import run


def _run(tmp_path, searcher, budget, **opts):
    cfg = RunConfig(task="quadratic", searcher=searcher, budget=budget, seed=0, task_options={"dim": 4},
                    searcher_options=opts, results_dir=str(tmp_path), quiet=True)
    rec = run(cfg, log=lambda m: None)
    rows = [json.loads(line) for line in open(tmp_path / "runs" / rec["run_id"] / "trace.jsonl")]
    return rec, rows


def test_warm_start_wraps_any_searcher(tmp_path):
    rec, rows = _run(tmp_path, "random", 30, warm=5)
    line = rows[:5]
    for a, r in zip(np.linspace(0, 1, 5), line):
        assert r["x"] == pytest.approx([a] * 4)
    best = min(line, key=lambda r: r["loss"])
    # random always scores its space's start first: the wrapper moved that start to the line's best.
    assert rows[5]["x"] == pytest.approx(best["x"])
    assert rec["searcher_info"]["warm_start"] == pytest.approx(best["x"][0])
    assert len(rows) == 30 and rec["config"]["searcher_options"]["warm"] == 5


def test_screening_wraps_any_searcher(tmp_path):
    rec, rows = _run(tmp_path, "random", 24, screen=0.5, finalists=3)
    screens, finals = rows[:21], rows[21:]
    assert all(r["fidelity"] == 0.5 for r in screens) and [r["fidelity"] for r in finals] == [1.0] * 3
    order = sorted(screens, key=lambda r: r["loss"])
    distinct = []
    for r in order:
        if not any(np.array_equal(r["x"], d) for d in distinct):
            distinct.append(r["x"])
    assert [r["x"] for r in finals] == distinct[:3]
    best = min(finals, key=lambda r: r["loss"])
    coeffs = rec["final"]
    assert rec["best_search_loss"] == pytest.approx(best["loss"]) and np.isfinite(coeffs["distance"])
    assert rec["searcher_info"]["screen"] == 0.5 and rec["searcher_info"]["finalists"] == 3


def test_wrapper_options_are_checked_and_kept_out_of_the_setting_when_default():
    for bad, match in (({"warm": 1}, "warm"), ({"screen": 1.5}, "screen"), ({"finalists": 0}, "finalists")):
        with pytest.raises(HarnessError, match=match):
            plan(RunConfig(task="quadratic", searcher="random", searcher_options=bad))
    with pytest.raises(HarnessError, match="screen.*black-box"):
        plan(RunConfig(task="quadratic", searcher="gradient", searcher_options={"screen": 0.5}))
    p = plan(RunConfig(task="quadratic", searcher="random", searcher_options={"warm": 0, "sigma": 0.3}))
    assert p.config.searcher_options == {"mode": "local", "sigma": 0.3}


class _Twice(Searcher):
    """A minimal template searcher: asks the start, then +1 on every coordinate."""

    name = "twice"

    def _ask(self, n):
        return [Candidate(x=self.space.start + len(self.asked)) for _ in range(n) if not self.asked.append(1)]

    def __init__(self, *a):
        super().__init__(*a)
        self.asked = []


def test_the_template_numbers_candidates_and_keeps_the_best():
    s = _Twice(Space(dim=2), 10, 2, 0, _Twice.Options())
    a = s.ask(2)
    assert [c.id for c in a] == [0, 1]
    s.tell(a, [Evaluation(loss=3.0), Evaluation(loss=1.0)])
    assert s.best_loss == 1.0 and s.recommend().tolist() == [2.0, 2.0]
    b = s.ask(1)
    assert b[0].id == 2
    # Low-fidelity, mini-batch and failed scores never become the best point.
    s.tell([Candidate(x=np.zeros(2), fidelity=0.5), Candidate(x=np.ones(2), batch=1), b[0]],
           [Evaluation(loss=0.0), Evaluation(loss=0.0), Evaluation(loss=-1.0, ok=False)])
    assert s.best_loss == 1.0


def test_validate_runs_once_in_the_base_class():
    cls = registry.load("searcher", "task-arithmetic")
    with pytest.raises(HarnessError, match=r"hi must be >= lo \(1.0\), got 0.0"):
        cls(Space(dim=2), 10, 1, 0, cls.Options(lo=1.0, hi=0.0))


def test_warm_start_keeps_the_line_best_unless_the_inner_search_scores_better_on_the_whole_set():
    from harness.wrappers import WarmStart

    class Away(Searcher):
        """Asks given points; recommends the last one asked, whatever it scored (as a searcher that
        scores only its answer on the whole set does)."""
        name = "away"
        plan: list = []

        def _ask(self, n):
            out, Away.plan[:] = Away.plan[:n], Away.plan[n:]
            self.last = out[-1].x
            return out

        def _recommend(self):
            return self.last.copy()

    space = Space(dim=2, lower=np.full(2, -1.0), upper=np.full(2, 1.0), start=np.zeros(2))
    w = WarmStart(lambda sp, b: Away(sp, b, 2, 0, Away.Options()), space, 10, 2, 0, k=3)
    line = w.ask(3)  # 0, 0.5, 1 along the line; 0.5 scores best (0.2)
    w.tell(line, [Evaluation(loss=0.2 + abs(float(c.x[0]) - 0.5)) for c in line])
    Away.plan[:] = [Candidate(x=np.full(2, -1.0), batch=7), Candidate(x=np.full(2, 1.0))]
    w.tell(inner := w.ask(2), [Evaluation(loss=0.0), Evaluation(loss=9.0)])  # a mini-batch's 0.0 does not count
    assert w.recommend() == pytest.approx([0.5, 0.5])  # the inner answer scored 9.0 on the whole set
    Away.plan[:] = [Candidate(x=np.full(2, 0.25))]
    w.tell(w.ask(1), [Evaluation(loss=0.1)])  # the inner search beat the line on the whole set
    assert w.recommend() == pytest.approx([0.25, 0.25])
