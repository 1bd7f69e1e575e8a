"""Task negation: the loss by hand, the control floor (penalty, constraint, leaderboard), the control pool."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from harness import registry
from harness.api import Candidate, Evaluation, HarnessError
from harness.config import resolve_options
from harness.leaderboards import leaderboard

from tests.test_conformance import TASK_OPTIONS


def _negation(cache_dir, **extra):
    cls = registry.load("task", "negation")
    opts = resolve_options(cls, dict(TASK_OPTIONS["negation"], **extra), "task")
    registry.validate("task", cls, opts)
    task = cls(opts, space="per_block", seed=0, cache_dir=cache_dir)
    task.setup("cpu")
    return task


@pytest.fixture(scope="module")
def negation(cache_dir):
    return _negation(cache_dir)


def test_search_loss_is_capped_target_ce_against_control_ce(negation):
    task = negation
    x = np.random.default_rng(0).uniform(-0.5, 0.5, task.space().dim)
    ev = task.evaluate([Candidate(x=x)])[0]
    with torch.no_grad():
        params = task.comp.merge(torch.as_tensor(x, dtype=torch.float32))
        (ce_t, ce_c), (ok_t, ok_c) = task.engine.per_sample_ce(params, task.search.names, task.search.inputs,
                                                   task.search.labels)
    cap = math.log(len(task.source.classes["skdigits"]))
    want = 0.5 * -ce_t.clamp(max=cap).mean() + 0.5 * ce_c.mean()
    assert ev.loss == pytest.approx(float(want), rel=1e-5)
    assert ev.metrics["target_acc"] == pytest.approx(float(ok_t.float().mean()), abs=1e-6)
    assert ev.metrics["control_acc"] == pytest.approx(float(ok_c.float().mean()), abs=1e-6)


def test_penalty_below_the_floor_plus_margin_and_the_constraint(negation):
    task, o = negation, negation.options
    floor = (o.floor + o.margin) * task.zs_control_val
    above = task.complete(Candidate(x=np.zeros(1)), Evaluation(loss=1.0, metrics={"control_acc": floor + 0.01}))
    below = task.complete(Candidate(x=np.zeros(1)), Evaluation(loss=1.0, metrics={"control_acc": floor - 0.1}))
    assert above.loss == 1.0
    assert below.loss == pytest.approx(1.0 + o.penalty * 0.1)
    step = task.complete(Candidate(x=np.zeros(1), batch=3), Evaluation(loss=1.0, metrics={"control_acc": 0.0}))
    assert step.loss == 1.0  # mini-batch steps are not penalised (too noisy)
    zero = task.final(np.zeros(task.space().dim))
    assert zero["control_retained"] == pytest.approx(1.0) and task.constraint_ok(zero)
    assert not task.constraint_ok({"control_retained": o.floor - 0.001})


def test_control_pool_train_and_val(cache_dir, negation):
    both, val = negation, _negation(cache_dir, control_split="val")
    assert both.options.control_split == "train+val"  # the default
    src = both.source
    want = torch.cat([src.labels["lfw"]["train"], src.labels["lfw"]["val"]])
    assert torch.equal(both.search.labels[1], want)
    assert torch.equal(val.search.labels[1], src.labels["lfw"]["val"])
    assert torch.equal(both.search.labels[0], val.search.labels[0])  # the target part is unchanged
    assert both.zs == val.zs  # test-side references do not depend on the pool
    with pytest.raises(HarnessError, match="control_split='test' is not one of val, train"):
        _negation(cache_dir, control_split="test")


def _record(root, run_id, searcher, seed, value, ok):
    d = root / "runs" / run_id
    d.mkdir(parents=True)
    rec = {"run_id": run_id, "status": "complete", "task": "negation", "searcher": searcher, "seed": seed,
           "key": searcher, "headline": "target_acc", "higher_is_better": False, "final": {"target_acc": value},
           "constraint_ok": ok, "evaluations": 10, "wall_time_s": 1.0, "peak_rss_mb": 100.0,
           "config": {"space": "per_block", "budget": 10, "searcher_options": {}, "task_options": {}}}
    (d / "record.json").write_text(json.dumps(rec))


def test_leaderboard_ranks_only_runs_that_keep_the_control(tmp_path):
    _record(tmp_path, "a0", "a", 0, 0.10, False)  # lowest target, but the control broke: not ranked on
    _record(tmp_path, "a1", "a", 1, 0.40, True)
    _record(tmp_path, "b0", "b", 0, 0.30, True)
    _record(tmp_path, "b1", "b", 1, 0.32, True)
    _record(tmp_path, "c0", "c", 0, 0.05, False)  # no run meets the floor: no rank
    board = leaderboard(tmp_path).set_index("searcher")
    assert board.loc["a", "mean"] == pytest.approx(0.40) and board.loc["a", "n_ok"] == 1 and board.loc["a", "n"] == 2
    assert board.loc["b", "rank"] == 1 and board.loc["a", "rank"] == 2
    assert math.isnan(board.loc["c", "mean"]) and math.isnan(board.loc["c", "rank"])
