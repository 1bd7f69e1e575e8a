"""Performance features: fidelity (multi-fidelity screening), block selection (paper App. D.6).

Numbers only, never timings: the speed figures come from ``python -m harness bench perf``.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from harness import registry
from harness.api import Candidate, HarnessError
from harness.composition import Composition, top_tasks_per_block
from harness.config import RunConfig, resolve_options
from harness.evaluators import LocalEvaluator, fidelity_shard
from harness.runner import run
from harness.selection import select_informative

from tests.test_conformance import TASK_OPTIONS


def _comp(space="per_block", T=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = {"a.weight": torch.randn(4, 3, generator=gen), "a.bias": torch.randn(4, generator=gen),
            "b.weight": torch.randn(2, 4, generator=gen)}
    tvs = [{k: torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(T)]
    return Composition(base, tvs, [f"t{i}" for i in range(T)], space=space), base, tvs


@pytest.mark.parametrize("space", ["per_block", "per_task", "per_partition:2", "per_partition:2:matrices"])
def test_selection_merges_only_kept_task_vectors(space):
    comp, base, tvs = _comp(space)
    ref, _, _ = _comp(space)
    keep = [[0, 2], [1], []]
    before = comp.memory_bytes()
    comp.select(keep)
    assert comp.memory_bytes() == sum(
        len(k) * base[b].numel() * 4 for k, b in zip(keep, comp.blocks))
    assert comp.memory_bytes() < before
    x = torch.linspace(-1, 1, comp.dim, dtype=torch.float64)
    lam = ref.coefficients(x).clone()
    for b, k in enumerate(keep):  # zeroing the dropped (task, block) coefficients = the selection
        drop = [t for t in range(comp.T) if t not in k]
        lam[drop, b] = 0
    merged = comp.merge(x)
    for b, name in enumerate(comp.blocks):
        lb = lam[:, b]
        if comp.partitions is None:
            want = base[name] + sum(float(lb[t]) * tvs[t][name] for t in range(comp.T))
        elif comp.partitions[b] is None:  # the :matrices variant leaves the bias out
            want = base[name]
        else:
            per_elem = lb[:, comp.partitions[b].long()].float()
            want = base[name] + sum(per_elem[t] * tvs[t][name] for t in range(comp.T))
        assert torch.allclose(merged[name], want, atol=1e-5), name


def test_dropped_coefficients_have_no_gradient_and_errors_are_clear():
    comp, _, _ = _comp("per_block")
    comp.select([[0], [0, 1], [2]])
    x = torch.zeros(comp.dim, requires_grad=True)
    sum(v.sum() for v in comp.merge(x).values()).backward()
    g = x.grad.view(comp.T, comp.B)
    assert torch.all(g[1:, 0] == 0) and torch.all(g[2, 1] == 0) and torch.all(g[:2, 2] == 0)
    assert g[0, 0] != 0 and g[2, 2] != 0
    with pytest.raises(HarnessError, match="already dropped"):
        comp.select([[1], [0], [2]])
    with pytest.raises(HarnessError, match="one list of task indices per block"):
        comp.select([[0]])


def test_top_tasks_per_block():
    scores = np.array([[3.0, 0.1, 1.0], [1.0, 0.5, 1.0], [2.0, 0.2, 0.0]])
    assert top_tasks_per_block(scores, 2) == [[0, 2], [1, 2], [0, 1]]
    assert top_tasks_per_block(scores, 1) == [[0], [1], [0]]


def test_fidelity_shard():
    assert fidelity_shard(1.0) is None
    assert fidelity_shard(0.25) == (0, 4)
    assert fidelity_shard(0.3) == (0, 3)
    with pytest.raises(ValueError):
        fidelity_shard(0.0)


@pytest.fixture(scope="module")
def small_addition(cache_dir):
    cls = registry.load("task", "addition")
    task = cls(resolve_options(cls, TASK_OPTIONS["addition"], "task"), space="per_block", seed=0,
               cache_dir=cache_dir)
    task.setup("cpu")
    return task


def test_low_fidelity_scores_a_fixed_part_of_every_data_set(small_addition):
    task = small_addition
    x = np.random.default_rng(0).uniform(-0.3, 0.3, task.space().dim)
    ev = LocalEvaluator(task)
    low, full = ev.evaluate([Candidate(x=x, fidelity=0.5), Candidate(x=x)])
    assert low.loss == pytest.approx(task.evaluate([Candidate(x=x)], shard=(0, 2))[0].loss, rel=1e-6)
    assert full.loss == pytest.approx(task.evaluate([Candidate(x=x)])[0].loss, rel=1e-6)
    assert low.weight == pytest.approx(0.5, abs=0.05) and full.weight == pytest.approx(1.0)
    assert low.loss != pytest.approx(full.loss, rel=1e-6)


def test_selection_on_a_zoo_keeps_the_largest_gradients(small_addition):
    task = small_addition
    comp = task.comp
    x = np.random.default_rng(1).uniform(-0.3, 0.3, comp.dim)
    start = Candidate(x=task.space().start, grad=True)
    g = np.abs(task.evaluate([start])[0].grad).reshape(comp.T, comp.B)
    before = task.evaluate([Candidate(x=x)])[0].loss
    try:
        report = select_informative(task, b=1)
        assert report["bytes_after"] == pytest.approx(report["bytes_before"] / comp.T, rel=1e-9)
        winners = g.argmax(0)
        assert [k.tolist() for k in comp.keep] == [[int(w)] for w in winners]
        # The same as zeroing every dropped coefficient of the full composition.
        masked = x.reshape(comp.T, comp.B).copy()
        masked[np.arange(comp.T)[:, None] != winners[None, :]] = 0
        after = task.evaluate([Candidate(x=x)])[0].loss
    finally:
        task.compose(task.names)  # restore the full composition for other tests
    assert after == pytest.approx(task.evaluate([Candidate(x=masked.reshape(-1))])[0].loss, rel=1e-5)
    assert after != pytest.approx(before, rel=1e-4)


def test_nevergrad_screening_spends_full_evaluations_on_finalists_only(tmp_path):
    budget, finalists = 60, 4
    cfg = RunConfig(task="quadratic", searcher="nevergrad", budget=budget, seed=0, task_options={"dim": 8},
                    searcher_options={"screen": 0.5, "finalists": finalists}, results_dir=str(tmp_path), quiet=True)
    rec = run(cfg, log=lambda m: None)
    rows = [json.loads(line) for line in open(tmp_path / "runs" / rec["run_id"] / "trace.jsonl")]
    assert len(rows) == budget
    fid = [r["fidelity"] for r in rows]
    assert fid[: budget - finalists] == [0.5] * (budget - finalists) and fid[budget - finalists:] == [1.0] * finalists
    screened = sorted(rows[: budget - finalists], key=lambda r: r["loss"])
    want = []
    for r in screened:
        if len(want) < finalists and not any(np.array_equal(r["x"], w) for w in want):
            want.append(r["x"])
    assert [r["x"] for r in rows[budget - finalists:]] == want
    best = min(rows[budget - finalists:], key=lambda r: r["loss"])
    assert rec["best_search_loss"] == pytest.approx(best["loss"])
    assert rec["final"]["loss"] == pytest.approx(best["loss"], rel=1e-9)  # the recommendation is that point
    # Compute: half-set screens plus full finalists.
    assert sum(r["weight"] for r in rows) == pytest.approx((budget - finalists) * 4 + finalists * 8)


def test_screen_option_is_checked():
    cls = registry.load("searcher", "nevergrad")
    with pytest.raises(HarnessError, match="screen"):
        cls.validate(resolve_options(cls, {"screen": 1.5}, "searcher"))


@pytest.mark.slow
def test_select_task_option_records_the_selection_and_ray_workers_select_alike(tmp_path):
    opts = dict(TASK_OPTIONS["addition"], select=1)
    common = dict(task="addition", searcher="random", space="per_block", budget=3, seed=0, task_options=opts,
                  results_dir=str(tmp_path), quiet=True)
    local = run(RunConfig(**common), log=lambda m: None)
    sel = local["selection"]
    assert sel["b"] == 1 and sel["bytes_after"] == pytest.approx(sel["bytes_before"] / sel["T"], rel=1e-9)
    assert sum(sel["kept"].values()) == sel["B"]  # one task vector per block
    full = run(RunConfig(**dict(common, task_options=dict(TASK_OPTIONS["addition"]))), log=lambda m: None)
    assert full["run_id"] != local["run_id"] and full.get("selection") is None
    # Each Ray worker selects on its own; a sharded run scores every candidate as the local one does.
    ray_rec = run(RunConfig(**dict(common, workers=2, parallel="data", rerun=True)), log=lambda m: None)
    assert ray_rec["selection"]["kept"] == sel["kept"]
    rows = lambda rec: [json.loads(l)["loss"] for l in open(tmp_path / "runs" / rec["run_id"] / "trace.jsonl")]
    assert rows(ray_rec) == pytest.approx(rows(local), rel=1e-5)
    assert rows(local) != pytest.approx(rows(full), rel=1e-4)  # selection changed the model


def test_select_needs_a_per_block_space(tmp_path):
    cfg = RunConfig(task="addition", searcher="random", space="per_layer", budget=2,
                    task_options=dict(TASK_OPTIONS["addition"], select=2), results_dir=str(tmp_path), quiet=True)
    with pytest.raises(HarnessError, match="select .*needs --space per_block"):
        run(cfg, log=lambda m: None)
    with pytest.raises(HarnessError, match="task option select must be >= 0, got -1"):
        run(RunConfig(**dict(vars(cfg), space="per_block", task_options=dict(TASK_OPTIONS["addition"], select=-1))),
            log=lambda m: None)
    assert not (tmp_path / "runs").exists()  # checked before anything is recorded


def test_nevergrad_warm_start_walks_the_isotropic_line_first(tmp_path):
    K = 5
    cfg = RunConfig(task="quadratic", searcher="nevergrad", budget=40, seed=0, task_options={"dim": 6},
                    searcher_options={"warm": K, "optimizer": "Cobyla"}, results_dir=str(tmp_path), quiet=True)
    rec = run(cfg, log=lambda m: None)
    rows = [json.loads(line) for line in open(tmp_path / "runs" / rec["run_id"] / "trace.jsonl")]
    assert len(rows) == 40
    for a, r in zip(np.linspace(0, 1, K), rows[:K]):
        assert r["x"] == pytest.approx([a] * 6)
    best_line = min(rows[:K], key=lambda r: r["loss"])
    assert rows[K]["x"] == pytest.approx(best_line["x"])  # Cobyla starts where the line was best
    assert rec["searcher_info"]["warm_start"] == pytest.approx(best_line["x"][0])
    assert rec["final"]["loss"] <= best_line["loss"]
    cls = registry.load("searcher", "nevergrad")
    with pytest.raises(HarnessError, match="warm"):
        cls.validate(resolve_options(cls, {"warm": 1}, "searcher"))


def test_population_scores_equal_sequential_ones_and_auto_records_its_choice(small_addition):
    task = small_addition
    rng = np.random.default_rng(2)
    cands = [Candidate(x=rng.uniform(-0.4, 0.4, task.space().dim)) for _ in range(4)]
    seq = [task.engine.weighted_ce(c, task.search) for c in cands]
    pop = task.engine.population_ce(cands, task.search)
    for a, b in zip(seq, pop):
        assert b.loss == pytest.approx(a.loss, rel=1e-5) and b.metrics["acc"] == pytest.approx(a.metrics["acc"])
        assert b.weight == a.weight
    half = task.engine.population_ce(cands, task.search, shard=(1, 2))
    assert half[2].loss == pytest.approx(task.engine.weighted_ce(cands[2], task.search, shard=(1, 2)).loss, rel=1e-5)
    task.task_info.pop("population", None)
    task.engine._vmap_faster = None
    try:
        first = task.evaluate(cands)  # times both paths once on 3 candidates
        note = task.task_info["population"]
        assert note["chosen"] in ("vmap", "sequential") and note["candidates"] == 3
        assert note["chosen"] == ("vmap" if note["vmap_s"] < note["sequential_s"] else "sequential")
        assert [e.loss for e in first[:3]] == [e.loss for e in seq[:3]]
        assert first[3].loss == pytest.approx(seq[3].loss, rel=1e-5)
        again = task.evaluate(cands)  # the chosen path from now on
        assert [e.loss for e in again] == pytest.approx([e.loss for e in seq], rel=1e-5)
    finally:
        task.task_info.pop("population", None)
        task.engine._vmap_faster = None
