"""Few-shot adapters (Tip-Adapter, Tip-Adapter-F, LP++) on hand-computed examples and in runs,
sequential and trained jointly with the coefficients."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import harness
from atlas_harness_tasks import adapters

ROOT = Path(__file__).resolve().parents[1]


def test_tip_adapter_logits_by_hand():
    # Two shots on the axes, one query at 60° from the first: affinities cos 60° = 0.5 and cos 30°.
    z = torch.tensor([[2.0, 0.0], [0.0, 3.0]])          # unnormalised: the cache normalises
    y = torch.tensor([0, 1])
    tip = adapters.make("tip", z, y, 2, alpha=2.0, beta=4.0)
    assert tip.size == 0
    q = torch.tensor([[math.cos(math.pi / 3), math.sin(math.pi / 3)]]) * 5
    h = torch.tensor([[0.1, 0.2]])
    got = tip.logits(q, h, tip.init)
    want = [0.1 + 2 * math.exp(-4 * (1 - 0.5)), 0.2 + 2 * math.exp(-4 * (1 - math.sqrt(3) / 2))]
    assert got[0].tolist() == pytest.approx(want, abs=1e-6)
    tipf = adapters.make("tip-f", z, y, 2, alpha=2.0, beta=4.0)
    assert tipf.size == 4 and tipf.init.tolist() == [1, 0, 0, 1]   # the keys are the parameters
    assert torch.allclose(tipf.logits(q, h, tipf.init), got)
    moved = torch.tensor([0.0, 1.0, 1.0, 0.0])                    # keys swapped: so are the cache logits
    assert tipf.logits(q, h, moved)[0].tolist() == pytest.approx([0.1 + 2 * math.exp(-4 * (1 - math.sqrt(3) / 2)),
                                                                   0.2 + 2 * math.exp(-4 * 0.5)], abs=1e-6)


def test_lpp_logits_by_hand():
    z = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])        # class 0 twice, class 1 once
    y = torch.tensor([0, 0, 1])
    h = torch.tensor([[1.0, -1.0], [2.0, 0.0], [0.0, 3.0]])
    lpp = adapters.make("lpp", z, y, 2, 1.0, 5.5, h)
    assert lpp.size == 2 * 2 + 2
    assert lpp.init.tolist() == [1, 0, 0, 1, 1, 1]                 # class means of ẑ, blends 1
    # s: the head logits' spread over the prototype logits' spread on the shots.
    proto = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert lpp.scale == pytest.approx(float(h.std() / proto.std()))
    q, hq = torch.tensor([[0.0, 5.0]]), torch.tensor([[0.5, 0.25]])
    p = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, -1.0])
    assert lpp.logits(q, hq, p)[0].tolist() == pytest.approx([2 * 0.5, lpp.scale - 0.25], abs=1e-6)


def test_adapter_training_fits_the_shots():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(40, 8, generator=gen)
    y = (z[:, 0] > 0).long()
    h = torch.zeros(40, 2)                                          # an uninformative head
    for name in ("tip-f", "lpp"):
        ad = adapters.make(name, z, y, 2, 1.0, 5.5, h if name == "lpp" else None)
        p = adapters.train(ad, z, h, y, steps=200, lr=1e-2)
        before = torch.nn.functional.cross_entropy(ad.logits(z, h, ad.init), y)
        after = torch.nn.functional.cross_entropy(ad.logits(z, h, p), y)
        assert after < 0.75 * before, name


def test_sequential_and_joint_adapters_in_runs(cache_dir, tmp_path):
    kw = dict(task="few_shot", space="per_task", seed=0, results_dir=str(tmp_path), cache_dir=cache_dir)
    base = {"source": "tiny-clip", "target": "cvdigits", "shots": 4}
    plain = harness.run(searcher="gradient", budget=20, task_options=base, **kw)
    seq = harness.run(searcher="gradient", budget=20, task_options={**base, "adapter": "tip"}, **kw)
    # Sequential: the same search (same coefficients), then the adapter on top.
    assert np.allclose(plain.coefficients["x"], seq.coefficients["x"])
    assert seq.final["composed_acc"] == pytest.approx(plain.final["acc"])
    assert seq.final["acc"] != seq.final["composed_acc"]
    assert seq.references["zero-shot"]["acc"] == plain.references["zero-shot"]["acc"]  # zero-shot has no adapter
    alone = harness.run(searcher="zero-shot", budget=1, task_options={**base, "adapter": "lpp"}, **kw)
    assert alone.final["composed_acc"] == alone.final["zero_shot_acc"]
    # LP++ on tiny-clip's 64-d features and cvdigits' 10 classes: 10 × 64 prototypes + 10 blends.
    assert alone.record["task_info"]["adapter"] == {"name": "lpp", "mode": "sequential", "parameters": 650}
    joint = harness.run(searcher="gradient", budget=20, task_options={**base, "adapter": "lpp", "adapter_mode": "joint"}, **kw)
    x = joint.coefficients["x"]
    assert len(x) == 5 + 650                                   # 5 other task vectors, per task, then LP++
    coef, adapter = x[:5], x[5:]
    assert np.abs(coef).max() > 1e-3 and np.abs(adapter).max() > 1e-3   # both were learned
    assert joint.coefficients["coefficients"].shape[0] == 5   # the records expand the coefficients only


def test_joint_mode_needs_a_trainable_adapter(tmp_path):
    r = subprocess.run([sys.executable, "-m", "harness", "run", "--task", "few_shot", "--searcher", "gradient",
                        "-t", "source=tiny-clip", "-t", "adapter=tip", "-t", "adapter_mode=joint",
                        "--results-dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "error: adapter_mode=joint learns the adapter with the coefficients: use adapter=tip-f or lpp "
        "('tip' has no parameters to learn)")
    assert not any(tmp_path.rglob("record.json"))


def test_tip_search_picks_the_first_grid_point_that_corrects_the_head():
    # Two classes, one shot each (keys e1, e2). A validation image at e1 whose head says class 1:
    # logits = h + α·[1, e^-β] are right once α(1 − e^-β) > 1. The first β of the grid (0.1 + 0.0345 i)
    # where some α ≤ 2.855 does it is 0.445, and there only α = 2.855 (0.1 + 0.145 · 19) does.
    z = torch.eye(2)
    tip = adapters.TipAdapter(z, torch.tensor([0, 1]), 2)
    alpha, beta, acc = adapters.search_tip(tip, tip.init, z[:1], torch.tensor([[0.0, 1.0]]), torch.tensor([0]))
    assert acc == 1.0 and alpha == pytest.approx(0.1 + 0.145 * 19) and beta == pytest.approx(0.1 + 0.0345 * 10)
    # Nothing corrects a head that is right already: the first grid point is kept.
    alpha, beta, acc = adapters.search_tip(tip, tip.init, z[:1], torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    assert acc == 1.0 and (alpha, beta) == (pytest.approx(0.1), pytest.approx(0.1))


def test_tip_search_in_a_run_and_its_refusal(cache_dir, tmp_path):
    base = {"source": "tiny-clip", "target": "cvdigits", "shots": 4, "adapter": "tip"}
    kw = dict(task="few_shot", searcher="zero-shot", budget=1, seed=0, results_dir=str(tmp_path), cache_dir=cache_dir)
    fixed = harness.run(task_options=base, **kw)
    tuned = harness.run(task_options={**base, "tip_search": True}, **kw)
    assert "tip_alpha" not in fixed.final and 0.1 <= tuned.final["tip_alpha"] < 3 and 0.1 <= tuned.final["tip_beta"] < 7
    assert 0 <= tuned.final["tip_val_acc"] <= 1 and tuned.final["composed_acc"] == fixed.final["composed_acc"]
    assert "validation split" in str(tuned.record["data_touched"])
    r = subprocess.run([sys.executable, "-m", "harness", "run", "--task", "few_shot", "-t", "source=tiny-clip",
                        "-t", "adapter=lpp", "-t", "tip_search=true", "--results-dir", str(tmp_path / "bad")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "error: tip_search chooses Tip-Adapter's α and β: use adapter=tip or tip-f (got adapter='lpp')")


def test_lpp_step_sizes_by_hand():
    # ẑ = e1, e1, e2: ẐᵀẐ = diag(2, 1), λ_max 2, N = 3. L_P = s² · 2 / (2 · 3), so 1/L_P = 3 / s².
    # Σ_i h_ik² = (1 + 4 + 0, 1 + 0 + 9) = (5, 10): L_a = 10 / (2 · 3), so 1/L_a = 0.6.
    z = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 0, 1])
    h = torch.tensor([[1.0, -1.0], [2.0, 0.0], [0.0, 3.0]])
    lpp = adapters.make("lpp", z, y, 2, 1.0, 5.5, h)
    step_p, step_a = adapters.lpp_step_sizes(lpp, z, h)
    assert step_p == pytest.approx(3 / lpp.scale ** 2, rel=1e-9) and step_a == pytest.approx(0.6, rel=1e-9)
    # A constant-zero head gives the blends no gradient and no curvature: their step is 0, not ∞.
    assert adapters.lpp_step_sizes(lpp, z, torch.zeros(3, 2))[1] == 0.0


def test_lpp_lipschitz_constants_bound_the_hessians():
    # 1/step is an upper bound of each block's Hessian, wherever the parameters are (MM's premise).
    gen = torch.Generator().manual_seed(1)
    z, y, h = torch.randn(12, 4, generator=gen), torch.arange(12) % 3, 3 * torch.randn(12, 3, generator=gen)
    lpp = adapters.make("lpp", z, y, 3, 1.0, 5.5, h)
    step_p, step_a = adapters.lpp_step_sizes(lpp, z, h)
    n = 3 * 4
    for trial in range(5):
        p = lpp.init + torch.randn(lpp.size, generator=gen) * (0.1 * trial)
        hess = torch.autograd.functional.hessian(
            lambda q: torch.nn.functional.cross_entropy(lpp.logits(z, h, q), y), p)
        top_p = float(torch.linalg.eigvalsh(hess[:n, :n])[-1])
        top_a = float(torch.linalg.eigvalsh(hess[n:, n:])[-1])
        assert 0 < top_p <= (1 + 1e-5) / step_p and 0 < top_a <= (1 + 1e-5) / step_a
    # And no smaller constant bounds them: two classes at probability ½ each (all logits 0, at
    # p = 0) and a head whose two columns agree reach both bounds, so the curvature ½ per sample
    # is needed (¼, as in the authors' prototype step, would be too small a constant).
    y2, h2 = torch.arange(12) % 2, h[:, :1].repeat(1, 2)
    lpp = adapters.make("lpp", z, y2, 2, 1.0, 5.5, h2)
    step_p, step_a = adapters.lpp_step_sizes(lpp, z, h2)
    hess = torch.autograd.functional.hessian(
        lambda q: torch.nn.functional.cross_entropy(lpp.logits(z, h2, q), y2), torch.zeros(lpp.size))
    assert float(torch.linalg.eigvalsh(hess[:8, :8])[-1]) == pytest.approx(1 / step_p, rel=1e-4)
    assert float(torch.linalg.eigvalsh(hess[8:, 8:])[-1]) == pytest.approx(1 / step_a, rel=1e-4)


def test_lpp_mm_descends_monotonically():
    gen = torch.Generator().manual_seed(0)
    z, y = torch.randn(30, 6, generator=gen), torch.arange(30) % 3
    h = 5 * torch.randn(30, 3, generator=gen)                      # a head that knows nothing
    lpp = adapters.make("lpp", z, y, 3, 1.0, 5.5, h)
    ce = lambda p: float(torch.nn.functional.cross_entropy(lpp.logits(z, h, p), y))  # noqa: E731
    assert torch.equal(adapters.train_lpp_mm(lpp, z, h, y, 0), lpp.init)
    losses = [ce(adapters.train_lpp_mm(lpp, z, h, y, k)) for k in range(31)]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.5 * losses[0]
    # Full batch and no randomness: the same answer twice.
    assert torch.equal(adapters.train_lpp_mm(lpp, z, h, y, 5), adapters.train_lpp_mm(lpp, z, h, y, 5))


def test_lpp_lipschitz_solver_in_a_run_and_its_refusals(cache_dir, tmp_path):
    from harness.config import build_config
    from harness.problem import plan
    base = {"source": "tiny-clip", "target": "cvdigits", "shots": 4, "adapter": "lpp"}
    kw = dict(task="few_shot", searcher="zero-shot", budget=1, seed=0, results_dir=str(tmp_path), cache_dir=cache_dir)
    adam = harness.run(task_options=base, **kw)
    mm = harness.run(task_options={**base, "lpp_solver": "lipschitz"}, **kw)
    assert "solver" not in adam.record["task_info"]["adapter"] and "lpp_step_p" not in adam.final
    assert mm.record["task_info"]["adapter"] == {"name": "lpp", "mode": "sequential", "parameters": 650,
                                                 "solver": "lipschitz"}
    assert mm.final["lpp_step_p"] > 0 and mm.final["lpp_step_a"] > 0
    assert mm.final["composed_acc"] == adam.final["composed_acc"] and mm.final["acc"] != adam.final["acc"]

    def run_id(**opts):
        cfg = build_config({"task": "few_shot", "searcher": "zero-shot", "task_options": {**base, **opts}})
        return plan(cfg).config.run_id()
    assert run_id() == run_id(lpp_solver="adam") != run_id(lpp_solver="lipschitz")   # adam keeps earlier ids
    for opts, line in (
            (["adapter=lpp", "lpp_solver=bogus"], "error: task option lpp_solver='bogus' is not one of adam, lipschitz"),
            (["adapter=tip", "lpp_solver=lipschitz"], "error: lpp_solver=lipschitz trains LP++: use adapter=lpp "
                                                      "(got adapter='tip')"),
            (["adapter=lpp", "adapter_mode=joint", "lpp_solver=lipschitz"],
             "error: lpp_solver=lipschitz trains LP++ after the search; with adapter_mode=joint the searcher "
             "learns it: use adapter_mode=sequential")):
        r = subprocess.run([sys.executable, "-m", "harness", "run", "--task", "few_shot", "--searcher", "zero-shot",
                            "-t", "source=tiny-clip", *[a for o in opts for a in ("-t", o)],
                            "--results-dir", str(tmp_path / "bad")],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [line], r.stderr
    assert not (tmp_path / "bad").exists()
