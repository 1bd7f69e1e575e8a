"""aTLAS×K's partitions: ours (every block, its own draw) and the released code's variant
(``per_partition:K:matrices``: 2-D matrices only, one draw per shape)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from harness.api import HarnessError
from harness.composition import Composition, functional_forward, parse_space
from harness.spaces import draw_partitions, matrices_only

NAMES = ["a", "b"]


def _zoo():
    """Two 4×4 linear layers (one shape, so one shared draw in the :matrices variant), a
    LayerNorm and a 3×4 head; two seeded random task vectors."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3)).eval()
    base = {k: v.detach().clone() for k, v in net.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    tvs = [{k: torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in NAMES]
    return net, base, tvs


def test_the_default_draw_is_one_per_block_in_block_order():
    """``per_partition:K`` keeps its assignment: one draw per block from one seeded generator."""
    _, base, tvs = _zoo()
    comp = Composition(base, tvs, NAMES, space="per_partition:3", seed=7)
    gen = torch.Generator().manual_seed(7)
    expected = [torch.randint(0, 3, tuple(v.shape), generator=gen).to(torch.uint8) for v in base.values()]
    assert all(torch.equal(p, e) for p, e in zip(comp.partitions, expected))
    assert comp.dim == 2 * len(base) * 3 and comp.parted == list(range(len(base)))


def test_the_matrices_variant_partitions_matrices_only_with_one_draw_per_shape():
    _, base, tvs = _zoo()
    comp = Composition(base, tvs, NAMES, space="per_partition:3:matrices", seed=7)
    matrices = [b for b, k in enumerate(comp.blocks) if base[k].ndim == 2]
    assert comp.parted == matrices == [0, 2, 6]
    assert comp.dim == 2 * 3 * 3 and len(comp.labels) == comp.dim == len(set(comp.labels))
    assert comp.labels[:4] == ["a/0.weight#0", "a/0.weight#1", "a/0.weight#2", "a/1.weight#0"]
    assert [p is None for p in comp.partitions] == [base[k].ndim != 2 for k in comp.blocks]
    assert comp.partitions[0] is comp.partitions[2]  # both 4×4 weights share one draw
    assert comp.partitions[6].shape == (3, 4)
    assert len(comp.partitions[0].unique()) == 3


def test_the_matrices_variant_merges_as_the_released_formula():
    """Δ = Σ_t Σ_k λ_{t,k} · onehot(mask)_k ⊙ τ_t on each 2-D block; every other block keeps θ0."""
    net, base, tvs = _zoo()
    K = 3
    comp = Composition(base, tvs, NAMES, space=f"per_partition:{K}:matrices", seed=2)
    x = np.random.default_rng(0).uniform(-1, 1, comp.dim)
    merged = comp.merge(x)
    lam = torch.tensor(x, dtype=torch.float32).view(2, len(comp.parted), K)
    for j, b in enumerate(comp.parted):
        name = comp.blocks[b]
        onehot = torch.nn.functional.one_hot(comp.partitions[b].long(), K).movedim(-1, 0).float()  # (K, *shape)
        delta = sum(torch.einsum("k,k...->...", lam[t, j], onehot) * tvs[t][name] for t in range(2))
        torch.testing.assert_close(merged[name], base[name] + delta, rtol=1e-6, atol=1e-6)
    for b, name in enumerate(comp.blocks):
        if b not in comp.parted:
            assert torch.equal(merged[name], base[name])
    # All ones is task arithmetic at α = 1 on the matrices, nothing elsewhere.
    ones = comp.merge(comp.isotropic(1.0))
    for name in comp.blocks:
        want = base[name] + tvs[0][name] + tvs[1][name] if base[name].ndim == 2 else base[name]
        torch.testing.assert_close(ones[name], want)
    lam_full = comp.expand(x)
    assert lam_full.shape == (2, len(base), K) and not lam_full[:, [1, 3, 4, 5, 7]].any()
    # The merge feeds a forward, and only x gets a gradient.
    xt = torch.tensor(x, requires_grad=True)
    functional_forward(net, comp.merge(xt), torch.randn(5, 4)).sum().backward()
    assert xt.grad.shape == (comp.dim,) and xt.grad.abs().min() > 0


def test_parse_and_errors():
    assert parse_space("per_partition:5:matrices") == ("per_partition", 5)
    assert matrices_only("per_partition:5:matrices") and not matrices_only("per_partition:5")
    for bad in ("per_partition:1:matrices", "per_partition:4:matrix", "per_partition::matrices"):
        with pytest.raises(HarnessError, match="unknown coefficient space"):
            parse_space(bad)
    base = {"bn.weight": torch.ones(3), "conv.weight": torch.zeros(2, 3, 1, 1)}
    tv = {k: torch.ones_like(v) for k, v in base.items()}
    with pytest.raises(HarnessError, match=r"partitions 2-D weight matrices, and none of the 2 composed blocks.*"
                                           r"use per_partition:4"):
        Composition(base, [tv], ["a"], space="per_partition:4:matrices")


def test_draws_are_seeded_and_shared_tensors_move_together():
    shapes = [(4, 4), (4,), (4, 4), (2, 4)]
    a, b = draw_partitions(shapes, 3, 1, matrices=True), draw_partitions(shapes, 3, 1, matrices=True)
    assert all((p is None and q is None) or torch.equal(p, q) for p, q in zip(a, b))
    c = draw_partitions(shapes, 3, 2, matrices=True)
    assert not torch.equal(a[0], c[0])
    _, base, tvs = _zoo()
    comp = Composition(base, tvs, NAMES, space="per_partition:3:matrices").to("cpu")
    assert comp.partitions[0] is comp.partitions[2] and comp.partitions[1] is None


def test_block_scores_of_the_matrices_variant_leave_other_blocks_at_zero():
    """Informative block selection sums |∂L/∂λ| over a block's K partitions; blocks the variant
    leaves out have no coefficient and score 0."""
    from types import SimpleNamespace

    from harness.api import Evaluation
    from harness.selection import block_scores
    _, base, tvs = _zoo()
    comp = Composition(base, tvs, NAMES, space="per_partition:2:matrices")
    grad = -np.arange(comp.dim, dtype=np.float64)
    task = SimpleNamespace(comp=comp, space=lambda: SimpleNamespace(start=np.zeros(comp.dim)),
                           evaluate=lambda cands: [Evaluation(loss=0.0, grad=grad)])
    scores = block_scores(task)
    want = np.zeros((2, len(base)))
    want[:, comp.parted] = np.abs(grad).reshape(2, 3, 2).sum(-1)
    np.testing.assert_array_equal(scores, want)
    assert scores[0, 2] == 2 + 3 and scores[1, 6] == 10 + 11
