"""Few-shot and test-time adaptation tasks on the small tiny-clip zoo shared with the conformance suite."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.api import Candidate
from harness.config import RunConfig, resolve_options
from harness.runner import run
from atlas_harness_tasks.few_shot import FewShotTask
from harness.objective import shard_slice
from atlas_harness_tasks.tta import TTATask, augment, info_nce, sharpen, trusted_set

# The same zoo as tests/test_conformance.py's TASK_OPTIONS, so the session builds it once.
ZOO = {"source": "tiny-clip", "source_options": "datasets=skdigits,lfw;max_n=400;pretrain_steps=40;ft_steps=15"}


def _task(cls, cache_dir, seed=0, **options):
    task = cls(resolve_options(cls, {**ZOO, "target": "skdigits", **options}, "task"), space="per_block",
               seed=seed, cache_dir=cache_dir)
    task.setup()
    return task


@pytest.fixture(scope="module")
def few_shot(cache_dir):
    return _task(FewShotTask, cache_dir, shots=2)


# Small TTA settings: 48 test images, mini-batches of 16; threshold 0 so that every untrusted
# sample counts (the tiny model is rarely confident); trusted_fraction 1 so that 48 images of 10
# classes still give a trusted set (k = min(4.8, cap) = 4 per predicted class).
TTA = {"max_n": 48, "batch_size": 16, "threshold": 0.0, "trusted_fraction": 1.0}


@pytest.fixture(scope="module")
def tta_tasks(cache_dir):
    return {}


def _tta(cache_dir, tasks, objective):
    if objective not in tasks:
        tasks[objective] = _task(TTATask, cache_dir, objective=objective, **TTA)
    return tasks[objective]


@pytest.fixture(scope="module")
def ufm(cache_dir, tta_tasks):
    return _tta(cache_dir, tta_tasks, "ufm")


# --------------------------------------------------------------------------- pure functions

def test_trusted_set_hand_worked_example():
    # 8 samples, 2 classes: k = min(8 / 2, cap). Predicted class 0: samples 0 (.9), 2 (.6), 5 (.8),
    # 7 (.55); class 1: samples 1 (.7), 3 (.95), 4 (.51), 6 (.99).
    p0 = torch.tensor([.9, .3, .6, .05, .49, .8, .01, .55])
    probs = torch.stack([p0, 1 - p0], dim=1)
    idx, labels = trusted_set(probs, cap=2)
    assert idx.tolist() == [0, 3, 5, 6]  # class 0: 0 (.9), 5 (.8); class 1: 6 (.99), 3 (.95)
    assert labels.tolist() == [0, 1, 0, 1]
    idx, labels = trusted_set(probs, cap=100)  # k = N / C = 4: every sample is trusted
    assert idx.tolist() == list(range(8))
    idx, _ = trusted_set(probs, cap=100, fraction=0.5)  # k = 2 again
    assert idx.tolist() == [0, 3, 5, 6]
    # A class nobody predicts contributes nothing; the other keeps only its top k.
    skewed = torch.tensor([[.9, .1, 0], [.8, .1, .1], [.7, .2, .1], [.2, .7, .1]])
    idx, labels = trusted_set(skewed, cap=100)  # k = floor(4 / 3) = 1
    assert idx.tolist() == [0, 3] and labels.tolist() == [0, 1]


def test_sharpen_and_info_nce():
    p = torch.tensor([[.6, .4], [.5, .5]])
    s = sharpen(p, 0.5)  # p² renormalised
    assert torch.allclose(s, torch.tensor([[.36 / .52, .16 / .52], [.5, .5]]))
    z = torch.eye(3)  # orthogonal features: each view's partner is identical, the others are not
    aligned = info_nce(z, z, temperature=1.0)
    swapped = info_nce(z, z[[1, 2, 0]], temperature=1.0)
    assert aligned.shape == (3,) and bool((aligned < swapped).all())
    # By hand: logits to the partner 1, to the 4 others 0 (same view) / 0 (other view) → CE = log(e + 4) − 1.
    assert aligned[0].item() == pytest.approx(np.log(np.e + 4) - 1, rel=1e-6)


@pytest.mark.parametrize("shape", [(5, 8, 8), (5, 25, 25, 3)])
def test_augment_keeps_shape_and_is_seeded(shape):
    images = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    for strength in ("weak", "strong"):
        a = augment(images, np.random.default_rng(1), strength)
        b = augment(images, np.random.default_rng(1), strength)
        c = augment(images, np.random.default_rng(2), strength)
        assert a.shape == images.shape and a.dtype == np.uint8
        assert np.array_equal(a, b) and not np.array_equal(a, c) and not np.array_equal(a, images)


# --------------------------------------------------------------------------- few-shot

def test_shots_follow_the_seed(cache_dir, few_shot):
    again = _task(FewShotTask, cache_dir, seed=0, shots=2)
    other = _task(FewShotTask, cache_dir, seed=1, shots=2)
    y = few_shot.source.labels["skdigits"]["train"]
    assert torch.equal(few_shot.shot_idx, again.shot_idx)
    assert not torch.equal(few_shot.shot_idx, other.shot_idx)
    # k shots of every class, and the search set is exactly those shots
    counts = torch.bincount(y[few_shot.shot_idx], minlength=10)
    assert counts.tolist() == [2] * 10
    assert torch.equal(few_shot.search.labels[0], y[few_shot.shot_idx])
    x = np.full(few_shot.space().dim, 0.3)
    assert few_shot.evaluate([Candidate(x=x)])[0].loss != other.evaluate([Candidate(x=x)])[0].loss


def test_target_task_vector_is_excluded(few_shot, ufm):
    for task in (few_shot, ufm):
        assert task.comp.task_names == ["lfw"]
        assert all(label.startswith("lfw/") for label in task.space().labels)
        assert task.space().dim == len(task.source.base)


def test_few_shot_augmented_views_and_l1(cache_dir, few_shot):
    task = _task(FewShotTask, cache_dir, shots=2, augment=2, l1=0.5)
    n = len(few_shot.shot_idx)
    assert len(task.search.labels[0]) == 3 * n
    assert not torch.equal(task.search.inputs[0][n:2 * n], task.search.inputs[0][:n])
    x = np.full(task.space().dim, -0.2)
    plain = _task(FewShotTask, cache_dir, shots=2, augment=2)
    diff = task.evaluate([Candidate(x=x)])[0].loss - plain.evaluate([Candidate(x=x)])[0].loss
    assert diff == pytest.approx(0.5 * 0.2, rel=1e-5)


def test_few_shot_runs_with_gradient_and_nevergrad(cache_dir, tmp_path, few_shot):
    start_loss = few_shot.evaluate([Candidate(x=np.zeros(few_shot.space().dim))])[0].loss
    for searcher, options, budget in (("gradient", {"lr": 0.1, "schedule": "cosine", "validate_every": 4}, 10),
                                      ("nevergrad", {}, 10)):
        rec = run(RunConfig(task="few_shot", searcher=searcher, budget=budget, seed=0, cache_dir=cache_dir,
                            task_options={**ZOO, "target": "skdigits", "shots": 2}, searcher_options=options,
                            results_dir=str(tmp_path), quiet=True), log=lambda m: None)
        assert rec["status"] == "complete" and rec["evaluations"] == budget
        assert set(rec["final"]) == {"acc", "zero_shot_acc", "gain"}
        assert rec["references"]["zero-shot"]["acc"] == rec["final"]["zero_shot_acc"]
        # both searchers find coefficients that fit the shots better than the start (λ = 0)
        assert rec["best_search_loss"] < start_loss - 1e-4, (searcher, rec["best_search_loss"], start_loss)


# --------------------------------------------------------------------------- test-time adaptation

def test_tta_never_reads_test_labels(cache_dir, ufm, monkeypatch):
    """Garbage test labels — before setup and after it — change nothing but the reported accuracy."""
    src = ufm.source
    x = np.random.default_rng(0).uniform(-0.5, 0.5, ufm.space().dim)
    cands = [Candidate(x=x), Candidate(x=x, grad=True, batch=7)]
    before = ufm.evaluate(cands)
    real = src.labels["skdigits"]["test"]
    acc = ufm.final(x)["acc"]
    src.labels["skdigits"]["test"] = torch.full_like(real, -1)
    try:
        after = ufm.evaluate(cands)
        assert [e.loss for e in after] == [e.loss for e in before]
        assert np.array_equal(after[1].grad, before[1].grad)
        assert ufm.final(x)["acc"] == 0.0  # final() is where the labels are read
    finally:
        src.labels["skdigits"]["test"] = real
    assert ufm.final(x)["acc"] == acc

    load = TTATask.load_source

    def garbled(self):
        source = load(self)
        source.labels["skdigits"]["test"] = torch.randint(0, 10, real.shape, generator=torch.Generator().manual_seed(5))
        return source
    monkeypatch.setattr(TTATask, "load_source", garbled)
    blind = _task(TTATask, cache_dir, objective="ufm", **TTA)
    assert torch.equal(blind.trusted, ufm.trusted) and torch.equal(blind.trusted_labels, ufm.trusted_labels)
    assert [e.loss for e in blind.evaluate(cands)] == [e.loss for e in before]


def test_ufm_trusted_set_and_batches(ufm):
    n = len(ufm.idx)
    assert len(ufm.trusted) + len(ufm.untrusted) == n
    assert set(ufm.trusted.tolist()).isdisjoint(ufm.untrusted.tolist())
    with torch.no_grad():
        probs = ufm._logits(ufm.source.base, ufm.clean).softmax(1)
    idx, labels = trusted_set(probs, ufm.options.trusted_cap, ufm.options.trusted_fraction)
    assert 0 < len(idx) < n
    assert torch.equal(idx, ufm.trusted) and torch.equal(labels, probs.argmax(1)[idx])
    t, u, w_t, w_u = ufm._ufm_data(Candidate(x=np.zeros(1), batch=3), None)
    assert len(t) == round(0.25 * ufm.options.batch_size) and len(t) + len(u) == ufm.options.batch_size
    assert w_t * len(t) == pytest.approx(0.25) and w_u * len(u) == pytest.approx(0.75)
    assert set(t.tolist()) <= set(ufm.trusted.tolist())


def test_im_objective_is_entropy_minus_entropy_of_the_mean(cache_dir, tta_tasks):
    """The information-maximisation loss, recomputed by hand from the zero-shot logits."""
    task = _tta(cache_dir, tta_tasks, "im")
    x = np.zeros(task.space().dim)
    ev = task.evaluate([Candidate(x=x)])[0]
    with torch.no_grad():
        p = task._logits(task.params(x, False)[0], task.clean).softmax(1).double()
    mean_ent = float(-(p * p.log()).sum(1).mean())
    pbar = p.mean(0)
    div = float(-(pbar * pbar.log()).sum())
    assert ev.loss == pytest.approx(mean_ent - div, abs=1e-5)
    assert ev.metrics["diversity"] == pytest.approx(div, abs=1e-5)
    assert not TTATask.shardable(task.options)
    assert TTATask.shardable(resolve_options(TTATask, {"objective": "entropy"}, "task"))
    # A shard is scored as a batch of its own (first half of the samples here).
    half = p[shard_slice(len(p), (0, 2))]
    hbar = half.mean(0)
    want = float(-(half * half.log()).sum(1).mean()) + float((hbar * hbar.log()).sum())
    assert task.evaluate([Candidate(x=x)], shard=(0, 2))[0].loss == pytest.approx(want, abs=1e-5)


def test_a_reliable_filter_that_keeps_no_sample_fails_the_score_instead_of_scoring_zero(cache_dir):
    """A mean over no sample is not a loss of 0 (the best loss: the search would then prefer the
    most uncertain model); whole-set scores fail, shards that all weigh 0 reduce to a failure."""
    from atlas_harness_tasks.tta import NO_RELIABLE
    from harness.evaluators import LocalEvaluator, reduce_shards
    task = _task(TTATask, cache_dir, objective="entropy", reliable=1e-9, **TTA)
    x = np.zeros(task.space().dim)
    ev = LocalEvaluator(task).evaluate([Candidate(x=x)])[0]
    assert not ev.ok and ev.error == NO_RELIABLE and ev.loss == 1e3
    shards = [task.evaluate([Candidate(x=x)], shard=(i, 2))[0] for i in range(2)]
    assert all(s.ok and s.weight == 0 for s in shards)
    red = reduce_shards(shards)
    assert not red.ok and "weighs 0" in red.error
    step = task.evaluate([Candidate(x=x, grad=True, batch=3)])[0]  # a mini-batch step without one: no update
    assert step.ok and step.loss == 0 and not np.any(step.grad)
    kept = _task(TTATask, cache_dir, objective="entropy", reliable=0.99, **TTA)
    assert LocalEvaluator(kept).evaluate([Candidate(x=x)])[0].ok


@pytest.mark.parametrize("objective", ["entropy", "im", "simclr", "ufm"])
def test_tta_gradient_run_through_the_runner(cache_dir, tmp_path, tta_tasks, objective):
    """A short gradient run lowers the entropy and SimCLR objectives on the search set. UFM's targets
    move with the model (pseudo-labels of the current coefficients), so its whole-set loss need not
    fall on the tiny zoo; its run must complete and move the coefficients. (SimCLR is nearly flat in
    the tiny zoo's one task vector: its steps use the whole set, batch_size = max_n.)"""
    extra = {"batch_size": TTA["max_n"]} if objective == "simclr" else {}
    rec = run(RunConfig(task="tta", searcher="gradient", budget=12, seed=0, cache_dir=cache_dir,
                        task_options={**ZOO, "target": "skdigits", "objective": objective, **TTA, **extra},
                        searcher_options={"lr": 0.1, "schedule": "cosine", "validate_every": 3},
                        results_dir=str(tmp_path), quiet=True), log=lambda m: None)
    assert rec["status"] == "complete" and rec["failed_evaluations"] == 0
    from pathlib import Path

    from harness.results import read_jsonl
    rows = read_jsonl(Path(tmp_path) / "runs" / rec["run_id"] / "trace.jsonl")
    validations = [r["loss"] for r in rows if not r["want_grad"]]
    assert len(validations) >= 3 and rec["best_search_loss"] == min(validations)
    assert set(rec["final"]) == {"acc", "zero_shot_acc", "gain"}
    assert np.abs(rows[-1]["x"]).max() > 0.05
    if objective != "ufm":
        start = _tta(cache_dir, tta_tasks, objective) if not extra else \
            _task(TTATask, cache_dir, objective=objective, **{**TTA, **extra})
        start_loss = start.evaluate([Candidate(x=np.zeros(start.space().dim))])[0].loss
        assert min(validations) < start_loss - 1e-3, (objective, start_loss, validations)


def test_few_shot_calibration_puts_the_start_at_the_best_temperature(cache_dir, few_shot):
    """With calibrate, the start point's loss is the minimum over every temperature of the head
    (so calming confidence alone cannot lower it), accuracy is unchanged, the temperature is recorded."""
    from atlas_harness_tasks.few_shot import fit_scale
    task = _task(FewShotTask, cache_dir, shots=2, calibrate=True)
    zero = Candidate(x=np.zeros(task.space().dim))
    start, plain = task.evaluate([zero])[0].loss, few_shot.evaluate([zero])[0].loss
    assert start <= plain + 1e-7
    assert task.final(zero.x)["acc"] == few_shot.final(zero.x)["acc"]
    t = task.task_info["temperature"]
    z = few_shot.source.logits(few_shot.source.base, few_shot.search.inputs[0], "skdigits")
    y = few_shot.search.labels[0]
    assert t == pytest.approx(1 / fit_scale(z, y), rel=1e-5)
    ce = [float(torch.nn.functional.cross_entropy(z / (t * f), y)) for f in (0.8, 1.0, 1.25)]
    assert ce[1] == pytest.approx(start, rel=1e-5) and ce[1] < ce[0] and ce[1] < ce[2]
    assert few_shot.source.heads["skdigits"][0] is not task.source.heads["skdigits"][0]
