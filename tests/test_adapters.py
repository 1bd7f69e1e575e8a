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
