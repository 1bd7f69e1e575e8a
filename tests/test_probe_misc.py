"""Findings of the reliability probe outside checkpoints, runs and reports: the Iso-C transform on
extreme weights, a task dimension that would exhaust memory, and the gradient searcher's hint."""
from __future__ import annotations

import pytest
import torch

from harness.api import HarnessError
from harness.config import RunConfig
from harness.transforms.common import flat_spectrum


@pytest.mark.parametrize("values", [torch.full((4, 3), 3e38), torch.full((4, 3), float("inf"))])
def test_iso_on_extreme_weights_is_one_line(values):
    with pytest.raises(HarnessError, match=r"^transform iso: ") as e:
        flat_spectrum(values)
    assert "\n" not in str(e.value)


def test_iso_on_large_finite_weights_still_works():
    m = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)) * 1e30
    out = flat_spectrum(m)
    s = torch.linalg.svdvals(out)
    torch.testing.assert_close(s, torch.full_like(s, float(torch.linalg.svdvals(m).mean())), rtol=1e-4, atol=0)


def test_a_task_dimension_that_would_exhaust_memory_is_refused(capsys):
    from harness.cli import main
    assert main(["run", "--task", "quadratic", "--searcher", "random", "-t", "dim=3000000000", "--quiet",
                 "--results-dir", "/nonexistent-never-written"]) == 2
    err = capsys.readouterr().err
    assert "task option dim must be >= 1, <= 10000000, got 3000000000" in err and err.count("\n") == 1


def test_gradient_at_the_papers_lr_on_a_zoo_gets_a_hint():
    from harness.cli import gradient_hint
    assert "--preset atlas" in gradient_hint(RunConfig(task="addition", searcher="gradient"))
    assert gradient_hint(RunConfig(task="addition", searcher="gradient", searcher_options={"lr": 0.01})) == ""
    assert gradient_hint(RunConfig(task="addition", searcher="gradient", task_options={"checkpoints": ["a=b"]})) == ""
    assert gradient_hint(RunConfig(task="addition", searcher="nevergrad")) == ""


@pytest.mark.parametrize("task, searcher, opts, message", [
    # a negative cap inverted the negation (the target's loss rose instead of fell): accepted before
    ("negation", "nevergrad", {"task_options": {"cap": -1.0}}, "task option cap must be > 0, got -1.0"),
    # a negative penalty rewarded breaking the control constraint
    ("negation", "nevergrad", {"task_options": {"penalty": -100.0}}, "task option penalty must be >= 0"),
    # gradient steps on empty mini-batches: a loss of 0 and no update, recorded as complete
    ("addition", "gradient", {"task_options": {"batch_size": 0}}, "task option batch_size must be >= 1, got 0"),
    ("negation", "gradient", {"task_options": {"batch_size": -5}}, "task option batch_size must be >= 1"),
    # the same run as 0 (all) under another run id
    ("addition", "nevergrad", {"task_options": {"search_n": -1}}, "task option search_n must be >= 0, got -1"),
    ("negation", "nevergrad", {"task_options": {"search_n": -1}}, "task option search_n must be >= 0"),
    # a first trust-region solve of 1e9 steps hung the run
    ("addition", "dfo-gn", {"searcher_options": {"inner_steps": 10**9}}, "inner_steps must be >= 1, <= 100000"),
    # an option the objective ignores, changing the run id only
    ("tta", "nevergrad", {"task_options": {"objective": "im", "reliable": 0.4}},
     "task option reliable filters the entropy objective's samples (SAR); objective 'im' does not use it"),
    # the engine names the valid precisions before dfo-gn's own refusal
    ("addition", "dfo-gn", {"task_options": {"precision": "fp8"}}, "precision='fp8' is not one of fp32, bf16, fp16"),
])
def test_values_that_ran_to_a_wrong_or_useless_result_are_refused(task, searcher, opts, message):
    from harness.problem import plan
    with pytest.raises(HarnessError) as e:
        plan(RunConfig(task=task, searcher=searcher, **opts))
    assert message in str(e.value) and "\n" not in str(e.value)
