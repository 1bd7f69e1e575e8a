"""The L1/L2 penalty on the coefficients of task addition and negation: added to every search loss
(whole set, mini-batch, gradient), exactly l1 × mean|λ| + l2 × mean λ²."""
from __future__ import annotations

import numpy as np
import pytest

from harness.api import Candidate
from harness.config import RunConfig
from harness.problem import build_task, plan

SMALL_ZOO = "datasets=skdigits,lfw;max_n=400;pretrain_steps=40;ft_steps=15"
TASKS = {"addition": {"search_n": 32}, "negation": {"target": "skdigits", "control": "lfw", "search_n": 32}}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_penalty_adds_exactly_its_value_and_gradient(name, cache_dir):
    def task(**opts):
        p = plan(RunConfig(task=name, searcher="gradient", space="per_task", seed=0, cache_dir=cache_dir, quiet=True,
                           task_options={"source": "tiny-clip", "source_options": SMALL_ZOO, **TASKS[name], **opts}))
        return build_task(p)[0]
    plain, pen = task(), task(l1=0.5, l2=2.0)
    x = np.array([0.3, -0.6])[:plain.comp.dim]           # negation composes the target's vector alone
    extra = 0.5 * np.abs(x).mean() + 2.0 * (x ** 2).mean()
    cands = [Candidate(x=x), Candidate(x=x, grad=True, batch=5)]
    for a, b in zip(plain.evaluate(cands), pen.evaluate(cands)):
        assert b.loss == pytest.approx(a.loss + extra, abs=1e-5)
    g_plain, g_pen = plain.evaluate([cands[1]])[0].grad, pen.evaluate([cands[1]])[0].grad
    assert np.allclose(g_pen - g_plain, (0.5 * np.sign(x) + 2.0 * 2 * x) / len(x), atol=1e-5)


def test_a_neutral_penalty_leaves_the_run_identity_alone():
    """Runs recorded before the penalty existed keep their ids; a penalty makes another run."""
    from harness.config import build_config
    def run_id(task, **opts):
        return plan(build_config({"task": task, "searcher": "nevergrad", "task_options": opts})).config.run_id()
    for task in ("addition", "negation"):
        assert run_id(task) == run_id(task, l1=0.0, l2=0.0) != run_id(task, l1=0.1)
    assert run_id("tta") == run_id("tta", reliable=0.0)
    assert run_id("tta", objective="entropy") != run_id("tta", objective="entropy", reliable=0.4)


def test_a_reliable_margin_that_keeps_every_sample_is_refused():
    """No entropy exceeds ln(classes), so a margin of 1 or more would filter nothing while the
    record claims SAR's filter: refused in one line at plan time."""
    from harness.api import HarnessError
    from harness.config import build_config
    with pytest.raises(HarnessError, match=r"reliable.*1") as e:
        plan(build_config({"task": "tta", "searcher": "nevergrad", "task_options": {"objective": "entropy", "reliable": 1.0}}))
    assert "\n" not in str(e.value)
    plan(build_config({"task": "tta", "searcher": "nevergrad", "task_options": {"objective": "entropy", "reliable": 0.99}}))
