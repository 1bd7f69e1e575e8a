"""The LoRA baseline (``--space lora:R[:ALPHA]``), training on a fraction of the train split
(``-t fraction``), and the learnable-parameter count in records and leaderboards."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import harness
from harness.api import HarnessError
from harness.composition import Composition, parse_space


def _base():
    return {"attn.in_proj_weight": torch.randn(6, 4), "attn.in_proj_bias": torch.zeros(6),
            "conv.weight": torch.randn(3, 2, 2, 2), "ln.weight": torch.ones(4), "pos_embedding": torch.randn(5, 4)}


def test_lora_parameter_count_matches_the_formula():
    base = _base()
    comp = Composition(base, [{k: torch.zeros_like(v) for k, v in base.items()}], ["a"], space="lora:3")
    # r·(in + out) per adapted matrix, r = min(R, out, in): in_proj 6×4 → 3·(4+6); conv 3×8 → 3·(8+3).
    # The bias, the norm and the positional embedding (not a weight) are not adapted.
    assert comp.dim == 3 * (4 + 6) + 3 * (8 + 3)
    assert [comp.blocks[b] for b in comp.lora.index] == ["attn.in_proj_weight", "conv.weight"]
    big = Composition(base, [{k: torch.zeros_like(v) for k, v in base.items()}], ["a"], space="lora:16")
    assert big.dim == 4 * (4 + 6) + 3 * (8 + 3)                         # rank capped by min(out, in)
    assert parse_space("lora:8:16") == ("lora", 8)
    for bad in ("lora:0", "lora:x", "lora:4:0"):
        with pytest.raises(HarnessError, match="unknown coefficient space"):
            parse_space(bad)


def test_lora_merge_is_scaled_b_times_a():
    torch.manual_seed(0)
    base = _base()
    comp = Composition(base, [{k: torch.zeros_like(v) for k, v in base.items()}], ["a"], space="lora:2:6")
    assert comp.merge(np.zeros(comp.dim))["attn.in_proj_weight"].equal(base["attn.in_proj_weight"])  # start: θ0
    x = torch.randn(comp.dim, dtype=torch.float64).float()
    merged = comp.merge(x)
    a = x[:2 * 4].view(2, 4) + comp.lora.a0[0]
    b = x[2 * 4:2 * 4 + 6 * 2].view(6, 2)
    assert torch.allclose(merged["attn.in_proj_weight"], base["attn.in_proj_weight"] + (6 / 2) * b @ a, atol=1e-6)
    s = 2 * 4 + 6 * 2
    a2, b2 = x[s:s + 2 * 8].view(2, 8) + comp.lora.a0[1], x[s + 16:s + 16 + 3 * 2].view(3, 2)
    assert torch.allclose(merged["conv.weight"], base["conv.weight"] + 3 * (b2 @ a2).view(3, 2, 2, 2), atol=1e-6)
    assert merged["attn.in_proj_bias"].equal(base["attn.in_proj_bias"])
    # At x = 0 the gradient reaches B (A0 is not zero), so training starts.
    xt = torch.zeros(comp.dim, requires_grad=True)
    comp.merge(xt)["attn.in_proj_weight"].sum().backward()
    assert xt.grad[8:20].abs().sum() > 0 and xt.grad[:8].abs().sum() == 0
    assert not comp.expand(x.numpy()).any()                              # no task vector is scaled


def test_fraction_trains_on_a_seeded_share_and_params_are_recorded(cache_dir, tmp_path):
    kw = dict(task="few_shot", seed=0, results_dir=str(tmp_path), cache_dir=cache_dir)
    base = {"source": "tiny-clip", "target": "cvdigits"}
    frac = harness.run(searcher="gradient", budget=6, space="lora:2", task_options={**base, "fraction": 0.1}, **kw)
    assert frac.record["data_touched"] == "10% of the labelled train split"
    assert frac.record["learnable_parameters"] == len(frac.coefficients["x"]) > 1000
    per_task = harness.run(searcher="gradient", budget=6, space="per_task", task_options={**base, "shots": 2}, **kw)
    assert per_task.record["learnable_parameters"] == 5
    seq = harness.run(searcher="zero-shot", budget=1, space="per_task", task_options={**base, "shots": 2, "adapter": "lpp"}, **kw)
    assert seq.record["learnable_parameters"] == 650                    # nothing searched; LP++ trained after
    from harness.leaderboards import leaderboard
    board = leaderboard(tmp_path)
    assert sorted(board["params"]) == sorted([str(frac.record["learnable_parameters"]), "5", "650"])
    # The share is the run seed's: another seed draws other samples of the same size.
    from harness.problem import build_task, plan
    from harness.config import RunConfig
    sizes = []
    for seed in (0, 1):
        cfg = RunConfig(task="few_shot", searcher="gradient", seed=seed, space="per_task",
                        task_options={**base, "fraction": 0.1}, results_dir=str(tmp_path), cache_dir=cache_dir)
        task, _ = build_task(plan(cfg))
        sizes.append(task.shot_idx)
    n_train = len(task.source.labels["cvdigits"]["train"])
    assert len(sizes[0]) == len(sizes[1]) == round(0.1 * n_train) and not torch.equal(sizes[0], sizes[1])
