"""The spectral and mask-based merges (TSV-M, Iso-CTS, consensus, CART, WUDI) against hand-computed
examples: tiny matrices whose singular vectors and masks are known, and the baseline searchers
bound to them end to end."""
from __future__ import annotations

import math

import pytest
import torch

import harness.transforms as transforms
from harness.api import HarnessError


def _apply(spec, tvs, names=None):
    return transforms.load(spec).apply(tvs, names or [f"t{i}" for i in range(len(tvs))], 0)


def _unit(deg):
    return torch.tensor([math.cos(math.radians(deg)), math.sin(math.radians(deg))])


def test_tsvm_decorrelates_the_tasks_singular_vectors():
    """τ1 = 3·u1 e1ᵀ with u1 at 0°, τ2 = 2·u2 e2ᵀ with u2 at 60°: one triplet each (rank 2, T = 2).
    The orthonormal pair nearest (u1, u2) turns each 15° away from their bisector (30°), to −15°
    and 75°; the right vectors e1, e2 are already orthogonal. Each task keeps its singular value."""
    e1, e2 = torch.eye(2)
    tvs = [{"w": 3 * torch.outer(_unit(0), e1), "b": torch.tensor([2.0, 4.0])},
           {"w": 2 * torch.outer(_unit(60), e2), "b": torch.tensor([0.0, -2.0])}]
    out, names, info = _apply("tsvm", tvs)
    torch.testing.assert_close(out[0]["w"], 3 * torch.outer(_unit(-15), e1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1]["w"], 2 * torch.outer(_unit(75), e2), atol=1e-6, rtol=0)
    assert names == ["t0", "t1"] and info == {"matrices": 1, "rank_kept_per_task": 1.0}
    assert (out[0]["b"] + out[1]["b"]).tolist() == [1.0, 1.0]           # 1-D blocks averaged
    out, _, _ = _apply("tsvm:other=sum", tvs)
    assert (out[0]["b"] + out[1]["b"]).tolist() == [2.0, 2.0]


def test_tsvm_keeps_a_fraction_of_each_rank():
    """diag(5, 4, 1, 0.5) and diag(0.1, 0.2, 3, 2): with 1/T = 1/2 of rank 4 each task keeps its
    top 2 triplets, which are orthogonal across the tasks, so the merge is diag(5, 4, 3, 2)."""
    tvs = [{"w": torch.diag(torch.tensor([5.0, 4, 1, 0.5]))}, {"w": torch.diag(torch.tensor([0.1, 0.2, 3, 2]))}]
    out, _, _ = _apply("tsvm", tvs)
    torch.testing.assert_close(out[0]["w"] + out[1]["w"], torch.diag(torch.tensor([5.0, 4, 3, 2])), atol=1e-6, rtol=0)
    out, _, info = _apply("tsvm:fraction=0.25", tvs)
    assert info["rank_kept_per_task"] == 1
    torch.testing.assert_close(out[0]["w"] + out[1]["w"], torch.diag(torch.tensor([5.0, 0, 3, 0])), atol=1e-6, rtol=0)


def test_iso_cts_common_and_task_specific_subspaces():
    """τ1 = diag(5, 0, 2, 0), τ2 = diag(0, 3, 0, 1), common = 0.5 of rank 4: the common subspace is
    the top 2 directions of the sum diag(5, 3, 2, 1) (e1, e2); with it projected out, τ1's top
    direction is e3 (σ 2) and τ2's e4 (σ 1). All four are kept at the mean of 2, 1, 5, 3: 2.75·I."""
    tvs = [{"w": torch.diag(torch.tensor([5.0, 0, 2, 0])), "b": torch.tensor([1.0])},
           {"w": torch.diag(torch.tensor([0.0, 3, 0, 1])), "b": torch.tensor([3.0])}]
    out, names, info = _apply("iso-cts:common=0.5", tvs)
    assert names == ["iso-cts"] and len(out) == 1 and info["matrices"] == 1
    torch.testing.assert_close(out[0]["w"], 2.75 * torch.eye(4), atol=1e-5, rtol=0)
    assert out[0]["b"].tolist() == [2.0]                                  # mean of the 1-D blocks
    assert _apply("iso-cts:common=0.5,other=sum", tvs)[0][0]["b"].tolist() == [4.0]


def test_consensus_masks_hand_computed():
    """λ = 0.5, k = 2. Sum [8, 1, 0, 2.1]; mask_t = |τ_t| > 0.5·|sum − τ_t|:
    τ1 [4, 1, 0, 2]    rest [4, 0, 0, .1]   → 1 1 0 1
    τ2 [4, −1, 3, 0]   rest [4, 2, −3, 2.1] → 1 0 1 0
    τ3 [0, 1, −3, .1]  rest [8, 0, 3, 2]    → 0 1 1 0
    counts 2 2 2 1 → the last entry is selfish and dropped from every vector."""
    rows = [[4, 1, 0, 2], [4, -1, 3, 0], [0, 1, -3, 0.1]]
    tvs = [{"w": torch.tensor(r, dtype=torch.float32)} for r in rows]
    out, names, info = _apply("consensus:lam=0.5,k=2", tvs)
    assert [o["w"].tolist() for o in out] == [[4, 1, 0, 0], [4, -1, 3, 0], [0, 1, -3, 0]]
    assert info["kept_fraction"] == 0.75 and names == ["t0", "t1", "t2"]
    assert sum(o["w"] for o in _apply("consensus:lam=0.5,k=0", tvs)[0]).tolist() == pytest.approx([8, 1, 0, 2.1])
    assert sum(o["w"] for o in _apply("consensus:lam=0.5,k=3", tvs)[0]).tolist() == [0, 0, 0, 0]


def test_cart_average_plus_low_rank_centred_vectors():
    """τ = diag(6, 0), diag(0, 6), diag(3, 0): the average is diag(3, 2); the centred vectors
    diag(3, −2), diag(−3, 4), diag(0, −2) cut to rank 1 are diag(3, 0), diag(0, 4), diag(0, −2).
    The 1-D block (1, 2, 6) keeps its full centred values (−2, −1, 3), which sum to 0."""
    mats = [torch.diag(torch.tensor(d)) for d in ([6.0, 0], [0.0, 6], [3.0, 0])]
    tvs = [{"w": m, "b": torch.tensor([b])} for m, b in zip(mats, [1.0, 2.0, 6.0])]
    out, names, info = _apply("cart:rank=0.5", tvs, ["x", "y", "z"])
    assert names == ["average", "x", "y", "z"] and info["average"] == "average"
    expect = [torch.diag(torch.tensor(d)) for d in ([3.0, 2], [3.0, 0], [0.0, 4], [0.0, -2])]
    for o, e in zip(out, expect):
        torch.testing.assert_close(o["w"], e, atol=1e-6, rtol=0)
    assert [o["b"].item() for o in out] == pytest.approx([3, -2, -1, 3])
    assert _apply("cart", tvs, ["average", "y", "z"])[1][0] == "_average"   # never a data set's name


def test_wudi_reaches_the_closed_form_minimiser():
    """The WUDI loss Σ_i ‖(τ_m − τ_i) τ_iᵀ‖² / ‖τ_i‖² is quadratic in τ_m: its minimiser solves
    τ_m Σ G_i = Σ τ_i G_i with G_i = τ_iᵀ τ_i / ‖τ_i‖². Adam with a large step gets there."""
    gen = torch.Generator().manual_seed(3)
    tvs = [{"w": torch.randn(3, 4, generator=gen)} for _ in range(3)]
    g = [tv["w"].T @ tv["w"] / tv["w"].square().sum() for tv in tvs]
    best = sum(tv["w"] @ gi for tv, gi in zip(tvs, g)) @ torch.linalg.pinv(sum(g))
    out, names, info = _apply("wudi:steps=3000,lr=0.01", tvs)
    assert names == ["wudi"]
    torch.testing.assert_close(out[0]["w"], best, atol=2e-3, rtol=0)
    start, _, start_info = _apply("wudi:steps=1,lr=1e-12", tvs)
    torch.testing.assert_close(start[0]["w"], sum(tv["w"] for tv in tvs))   # it starts from the sum
    assert info["final_loss"] < start_info["final_loss"]


def test_wudi_leaves_disjoint_row_spaces_alone():
    """Task vectors whose rows live in orthogonal spaces do not disturb each other: the sum is
    already the minimum (loss 0), and stays."""
    tvs = [{"w": torch.tensor([[1.0, 0], [2, 0]])}, {"w": torch.tensor([[0.0, 3], [0, -1]])}]
    out, _, info = _apply("wudi:lr=0.1,steps=50", tvs)
    assert out[0]["w"].tolist() == [[1.0, 3.0], [2.0, -1.0]] and info["final_loss"] == 0


def test_spectral_transforms_refuse_non_finite_vectors_in_one_line():
    tvs = [{"w": torch.full((3, 2), float("inf"))}, {"w": torch.ones(3, 2)}]
    for spec in ("tsvm", "iso-cts", "cart"):
        with pytest.raises(HarnessError, match=rf"^transform {spec}: ") as e:
            _apply(spec, tvs)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec, message", [
    ("tsvm:fraction=2", "fraction must be >= 0, <= 1, got 2"), ("iso-cts:common=-1", "common must be >= 0"),
    ("consensus:k=-1", "k must be >= 0"), ("cart:rank=0", "rank must be > 0"), ("wudi:steps=0", "steps must be >= 1"),
    ("tsvm:conv=kernel", "conv='kernel' is not one of matrix, other")])
def test_bad_options_are_one_line(spec, message):
    with pytest.raises(HarnessError, match=message) as e:
        transforms.canonical(spec)
    assert "\n" not in str(e.value)


def test_cart_searcher_holds_the_average_at_one():
    import numpy as np
    import harness.registry as registry
    from harness.api import Space
    cls = registry.load("searcher", "cart")
    space = Space(dim=3, lower=-5, upper=5, labels=["average", "x", "y"])
    s = cls(space, 21, 21, 0, cls.Options())
    xs = [c.x for c in s.ask(21)]
    assert all(x[0] == 1.0 for x in xs) and np.allclose([x[1] for x in xs], np.linspace(0, 2, 21))


def test_matrices_keeps_the_weight_matrices_only():
    tvs = [{"w": torch.ones(2, 3), "b": torch.ones(2), "k": torch.ones(2, 1, 2, 2)},
           {"w": 2 * torch.ones(2, 3), "b": 2 * torch.ones(2), "k": 2 * torch.ones(2, 1, 2, 2)}]
    out, names, info = _apply("matrices", tvs, ["x", "y"])
    assert names == ["x", "y"] and info == {"kept_blocks": 2, "zeroed_blocks": 1}
    assert torch.equal(out[1]["w"], tvs[1]["w"]) and torch.equal(out[1]["k"], tvs[1]["k"]) and not out[1]["b"].any()
    out, _, info = _apply("matrices:conv=other", tvs, ["x", "y"])
    assert info["kept_blocks"] == 1 and not out[0]["k"].any()
