"""The derivative-free Gauss-Newton searcher (searchers/dfo_gn.py) and the outputs channel it reads.

Every task that returns its outputs must give logits whose loss formula (:class:`harness.outputs.
Outputs`) reproduces the task's own loss exactly, or the searcher's model would be of another
function; the searcher must solve a least-squares problem whose residuals are linear in one round,
never ask for the network's gradient, and refuse tasks that cannot return outputs before anything runs.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import harness
from harness.api import Candidate, HarnessError
from harness.config import RunConfig, resolve_options
from harness.evaluators import LocalEvaluator
from harness.problem import plan
from harness.registry import load

SMALL_ZOO = "datasets=skdigits,lfw;max_n=400;pretrain_steps=40;ft_steps=15"
TASKS = {
    "addition": {"search_n": 24},
    "negation": {"target": "skdigits", "control": "lfw", "search_n": 24},
    "few_shot": {"target": "skdigits", "shots": 2},
}


def build(name, cache_dir, space="per_layer", **extra):
    cls = load("task", name)
    opts = resolve_options(cls, {"source": "tiny-clip", "source_options": SMALL_ZOO, **TASKS[name], **extra}, "task")
    cls.validate(opts)
    task = cls(opts, space=space, seed=0, cache_dir=cache_dir)
    task.setup("cpu")
    return task


@pytest.mark.parametrize("name", sorted(TASKS))
def test_the_outputs_reproduce_the_task_loss(cache_dir, name):
    task = build(name, cache_dir)
    rng = np.random.default_rng(1)
    x = rng.uniform(-0.5, 1.0, task.space().dim)
    plain, with_out = LocalEvaluator(task).evaluate([Candidate(x=x), Candidate(x=x, outputs=True)])
    assert plain.outputs is None and with_out.outputs is not None
    assert with_out.loss == pytest.approx(plain.loss, rel=1e-6)
    out = with_out.outputs
    modelled = float(out.loss(torch.as_tensor(out.flat())))
    assert modelled == pytest.approx(with_out.loss, rel=1e-5, abs=1e-7)
    # The logits are the model's: a different point gives different logits and loss.
    other = LocalEvaluator(task).evaluate([Candidate(x=x * 0.0, outputs=True)])[0]
    assert not np.allclose(other.outputs.flat(), out.flat())
    if name == "negation":  # the forgetting term is capped and the control floor is carried
        assert out.caps[0] == pytest.approx(task.tcap) and out.caps[1] is None and len(out.floors) == 1


def test_the_floor_term_counts_like_the_task_penalty():
    from harness.outputs import Outputs
    # Two samples of part 1, one right: accuracy 0.5 below a floor of 0.8 costs 2 × 0.3.
    out = Outputs(logits=[np.zeros((1, 2)), np.array([[2.0, 0.0], [2.0, 0.0]])],
                  labels=[np.array([0]), np.array([0, 1])], weights=[np.ones(1), np.ones(2)],
                  caps=[None, None], floors=[(1, 0.8, 2.0)])
    ce = (np.log(2) + (np.log1p(np.exp(-2.0))) + (2.0 + np.log1p(np.exp(-2.0)))) / 3
    assert float(out.loss(torch.as_tensor(out.flat()))) == pytest.approx(ce + 2.0 * 0.3, rel=1e-9)


def test_linear_residuals_are_solved_in_one_round(tmp_path):
    """On the quadratic the residuals √w·(x − x*) are linear, so the model is exact: the first
    trust-region steps go straight to x* (the radius doubles from 0.5 up to the box)."""
    run = harness.run("quadratic", "dfo-gn", budget=7 + 4 * 8, seed=2, task_options={"dim": 6},
                      results_dir=str(tmp_path))
    assert run.status == "complete"
    assert run.final["distance"] < 1e-6
    trace = run.trace
    assert trace["loss"].iloc[:7].min() > 1e-3  # the anchor and its 6 probes are far from x*
    # no gradient was ever asked for: every row is a whole-set, forward-only evaluation
    assert not trace["batch"].notna().any()


def test_a_run_on_addition_improves_on_its_start_and_records_its_rounds(tmp_path, cache_dir):
    opts = {"source": "tiny-clip", "source_options": SMALL_ZOO, "search_n": 24}
    run = harness.run("addition", "dfo-gn", space="per_layer", budget=60, seed=0, task_options=opts,
                      results_dir=str(tmp_path), cache_dir=cache_dir)
    assert run.status == "complete" and run.evaluations == 60
    info = run.record["searcher_info"]
    dim = len(run.coefficients["x"])
    assert info["rounds"] >= 2 and info["trials"] >= 1 and info["accepted"] >= 1
    trace = run.trace
    start = trace["loss"].iloc[0]
    assert trace["loss"].min() < start - 0.05  # 1.334 → 1.227 on this tiny zoo
    # the first dim + 1 rows are the anchor and one probe per coordinate, each h away in one coordinate
    x = np.stack(trace["x"].iloc[: dim + 1].to_numpy())
    steps = x[1:] - x[0]
    assert np.allclose(np.abs(steps), 0.05 * np.eye(dim), atol=1e-12)


def test_tasks_without_outputs_are_refused_before_anything_runs():
    with pytest.raises(HarnessError, match="models the task's outputs.*does not return"):
        plan(RunConfig(task="tta", searcher="dfo-gn"))
    with pytest.raises(HarnessError, match="does not return"):
        plan(RunConfig(task="addition", searcher="dfo-gn", task_options={"objective": "entropy"}))
    with pytest.raises(HarnessError, match="does not return"):
        plan(RunConfig(task="addition", searcher="dfo-gn", task_options={"l1": 0.1}))
    with pytest.raises(HarnessError, match="radius .* must be at most max_radius"):
        plan(RunConfig(task="addition", searcher="dfo-gn", searcher_options={"radius": 2.0}))
    with pytest.raises(HarnessError, match="screen"):
        plan(RunConfig(task="addition", searcher="dfo-gn", searcher_options={"screen": 0.25}))
    # Finite differences of h = 0.05 are below bf16's rounding of the logits.
    for task in ("addition", "few_shot", "negation"):
        with pytest.raises(HarnessError, match="differences of nearby candidates, which bf16 rounding swamps; "
                                               "use -t precision=fp32"):
            plan(RunConfig(task=task, searcher="dfo-gn", task_options={"precision": "bf16"}))
    plan(RunConfig(task="few_shot", searcher="dfo-gn", task_options={"precision": "fp32"}))
    plan(RunConfig(task="few_shot", searcher="nevergrad", task_options={"precision": "bf16"}))


def test_the_command_line_refuses_a_task_without_outputs_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "harness", "run", "--task", "tta", "--searcher", "dfo-gn",
                           "--results-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: searcher 'dfo-gn' models the task's outputs, which task 'tta' does not return with these options "
        "(addition with objective=ce, few_shot without a joint adapter, negation; each without an l1/l2 term)"]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("region, norm", [("box", np.inf), ("ball", 2)])
def test_the_trial_step_stays_in_its_trust_region(region, norm):
    from atlas_harness_searchers.dfo_gn import DfoGnSearcher
    quad = load("task", "quadratic")
    task = quad(quad.Options(dim=9), seed=4)
    task.setup()
    opts = resolve_options(DfoGnSearcher, {"radius": 0.2, "max_radius": 0.2, "region": region}, "searcher")
    s = DfoGnSearcher(task.space(), 200, 4, 0, opts)
    trials = 0
    while trials < 3:
        cands = s.ask(4)
        kinds = [s.waiting[c.id][0] for c in cands]
        anchor = s.anchor.copy()
        s.tell(cands, task.evaluate(cands))
        if kinds == ["trial"]:
            trials += 1
            assert np.linalg.norm(cands[0].x - anchor, ord=norm) <= 0.2 + 1e-9
            assert np.linalg.norm(cands[0].x - anchor, ord=norm) > 0.1  # the optimum is far: it goes to the edge
    assert s.info["accepted"] == 3


def test_refresh_probes_again_only_the_coefficients_that_moved_most():
    from atlas_harness_searchers.dfo_gn import DfoGnSearcher
    quad = load("task", "quadratic")
    task = quad(quad.Options(dim=9), seed=4)
    task.setup()
    opts = resolve_options(DfoGnSearcher, {"refresh": 0.34}, "searcher")
    s = DfoGnSearcher(task.space(), 200, 1, 0, opts)
    asked = []
    while s.info["accepted"] < 2:
        cands = s.ask(1)
        asked += [(s.waiting[c.id][0], s.waiting[c.id][1], c) for c in cands]
        s.tell(cands, task.evaluate(cands))
    kinds = [k for k, _, _ in asked]
    first = kinds.index("trial")
    assert kinds[:first] == ["anchor"] + ["probe"] * 9  # the first round probes every coefficient
    second = kinds.index("trial", first + 1)
    probed = [i for k, i, _ in asked[first + 1:second] if k == "probe"]
    step = np.abs(asked[first][2].x - asked[0][2].x)
    assert len(probed) == 4 and set(probed) == set(np.argsort(-step, kind="stable")[:4])  # ceil(0.34 · 9)
    # anchors and trial steps are marked for the engine to keep; probes start from them
    assert all(c.anchor == (k != "probe") for k, _, c in asked)


def test_outputs_back_from_a_ray_worker_score_without_a_warning():
    """Arrays deserialised from a Ray worker are read-only; scoring them must not make torch warn
    (one warning per probe on stderr) and must give the same loss."""
    import warnings

    from harness.outputs import Outputs
    rng = np.random.default_rng(0)
    z, y, w = rng.normal(size=(4, 3)), np.array([0, 1, 2, 1]), np.full(4, 0.25)
    writable = Outputs(logits=[z], labels=[y], weights=[w])
    for a in (y, w):
        a.setflags(write=False)
    read_only = Outputs(logits=[z], labels=[y], weights=[w])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = float(read_only.loss(torch.as_tensor(read_only.flat())))
    assert got == float(writable.loss(torch.as_tensor(writable.flat())))


def test_minibatch_rounds_share_a_batch_and_the_answer_is_scored_on_the_whole_set(tmp_path, cache_dir):
    opts = {"source": "tiny-clip", "source_options": SMALL_ZOO, "target": "skdigits", "shots": 4, "batch_size": 8}
    run = harness.run("few_shot", "dfo-gn", space="per_task", budget=30, seed=3, task_options=opts,
                      searcher_options={"minibatch": True}, results_dir=str(tmp_path), cache_dir=cache_dir)
    assert run.status == "complete" and run.evaluations == 30
    trace = run.trace
    batches = trace["batch"].to_numpy()
    # the start and the answer are scored on the whole search set (the budget's first and last evaluations);
    # every other on a round's mini-batch, shared by the round's anchor, probes and trials
    assert pd.isna(batches[0]) and pd.isna(batches[-1]) and not pd.isna(batches[1:-1]).any()
    assert np.allclose(trace["x"].iloc[0], trace["x"].iloc[1])  # the first round's anchor is the start
    used = set(batches[1:-1])  # (the searcher's count includes a round queued when the budget ran out)
    assert len(used) >= 3 and used == {3 * 1_000_003 + r for r in range(len(used))}
    assert list(batches[1:-1]) == sorted(batches[1:-1])
    # the answer is the better of the two whole-set scores; the run's loss is its score
    best = 0 if trace["loss"].iloc[0] < trace["loss"].iloc[-1] else len(trace) - 1
    assert np.allclose(trace["x"].iloc[best], run.coefficients["x"])
    assert run.record["best_search_loss"] == pytest.approx(trace["loss"].iloc[best])
    for task, extra in (("negation", {}), ("quadratic", {})):  # outputs on the whole search set only
        with pytest.raises(HarnessError, match=f"minibatch=true .*task '{task}' returns only on its whole"):
            plan(RunConfig(task=task, searcher="dfo-gn", searcher_options={"minibatch": True}, task_options=extra))
    with pytest.raises(HarnessError, match="refresh < 1.*minibatch=true"):
        harness.run("few_shot", "dfo-gn", budget=30, task_options=opts,
                    searcher_options={"minibatch": True, "refresh": 0.5}, results_dir=str(tmp_path))


def test_probes_stay_in_the_box_whatever_the_step():
    from atlas_harness_searchers.dfo_gn import DfoGnSearcher
    from harness.api import Space
    space = Space(dim=3, lower=np.full(3, -1.0), upper=np.full(3, 1.0), start=np.array([0.97, -0.9, 0.0]))
    for step, want in ((0.05, [-0.05, 0.05, 0.05]), (5.0, [-1.97, 1.9, -1.0])):
        s = DfoGnSearcher(space, 50, 4, 0, resolve_options(DfoGnSearcher, {"step": step}, "searcher"))
        probes = [c.x for c in s.ask(4)[1:]]
        assert np.allclose(np.stack(probes) - space.start, np.diag(want))  # the most room the box leaves
        assert all(((p >= space.lower) & (p <= space.upper)).all() for p in probes)
    with pytest.raises(HarnessError, match="step must be >= 1e-06, got 1e-300"):
        plan(RunConfig(task="quadratic", searcher="dfo-gn", searcher_options={"step": 1e-300}))


def test_coarse_rounds_probe_and_step_whole_groups_then_every_coefficient():
    """With coarse_rounds=K the first K rounds model the logits along one direction per group (task
    vector × layer: every coefficient of the group moves together), so a round costs groups + 1
    evaluations and its trial step moves a group by one offset; later rounds probe each coefficient."""
    from atlas_harness_searchers.dfo_gn import DfoGnSearcher
    from harness.api import Evaluation, Space
    from harness.outputs import Outputs
    labels = [f"{t}/_blocks.{b}.{p}" for t in ("cars", "dtd") for b, p in ((13, "w"), (13, "b"), (14, "w"))]
    rng = np.random.default_rng(0)
    A, y = rng.normal(size=(6, 4 * 3)), np.array([0, 1, 2, 1])

    def evaluate(cands):
        out = []
        for c in cands:
            o = Outputs(logits=[(np.asarray(c.x) @ A).reshape(4, 3)], labels=[y], weights=[np.full(4, 0.25)])
            out.append(Evaluation(loss=float(o.loss(torch.as_tensor(o.flat()))), outputs=o))
        return out

    space = Space(dim=6, lower=np.full(6, -1.0), upper=np.full(6, 1.0), labels=labels)
    opts = resolve_options(DfoGnSearcher, {"coarse_rounds": 2, "radius": 0.3, "max_radius": 0.3}, "searcher")
    s = DfoGnSearcher(space, 60, 1, 0, opts)
    rounds, asked = [], []
    while len(rounds) < 3:
        c = s.ask(1)[0]
        kind = s.waiting[c.id][0]
        anchor = s.anchor.copy()
        asked.append((kind, c.x - anchor))
        s.tell([c], evaluate([c]))
        if kind == "trial":
            rounds.append(asked)
            asked = []
    groups = [[0, 1], [2], [3, 4], [5]]  # (cars, blocks.13), (cars, blocks.14), (dtd, …), (dtd, …)
    for r, steps in enumerate(rounds):
        probes = [d for k, d in steps if k == "probe"]
        trial = [d for k, d in steps if k == "trial"][-1]
        if r < 2:  # one probe per group; the step moves each group's coefficients together
            assert len(probes) == 4
            assert [list(np.flatnonzero(d)) for d in probes] == groups
            assert all(np.allclose(d[g], 0.05) for d, g in zip(probes, groups))
            assert all(np.ptp(trial[g]) < 1e-12 for g in groups) and np.abs(trial).max() > 0.1
        else:
            assert len(probes) == 6 and np.allclose(np.stack(probes), 0.05 * np.eye(6))
    assert s.info["accepted"] >= 2
    with pytest.raises(HarnessError, match="refresh < 1.*coarse_rounds > 0"):
        plan(RunConfig(task="addition", searcher="dfo-gn", searcher_options={"coarse_rounds": 1, "refresh": 0.5}))
