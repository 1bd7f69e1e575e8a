"""The functional merge of aTLAS on tiny in-memory models: exactness, spaces, gradients, errors."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from harness.api import HarnessError
from harness.composition import (Composition, functional_forward, layer_of, parse_space,
                                 task_vector)

SPACES = ["per_task", "per_layer", "per_block", "per_partition:3"]
NAMES = ["fashion", "digits", "faces"]


def tiny_net(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 3)).to(dtype).eval()


def finetune_copies(net: nn.Module, n: int, scale: float = 0.3, seed: int = 1) -> list[nn.Module]:
    """Random "fine-tuned" copies: every parameter moved by noise."""
    gen = torch.Generator().manual_seed(seed)
    copies = []
    for _ in range(n):
        ft = copy.deepcopy(net)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        copies.append(ft)
    return copies


@pytest.fixture(scope="module")
def zoo():
    net = tiny_net()
    fts = finetune_copies(net, len(NAMES))
    base = dict(net.state_dict())
    tvs = [task_vector(base, ft.state_dict()) for ft in fts]
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(7))
    return net, fts, base, tvs, x


@pytest.mark.parametrize("space", SPACES)
def test_zero_is_pretrained(zoo, space):
    net, _, base, tvs, x = zoo
    comp = Composition(base, tvs, NAMES, space=space)
    out = functional_forward(net, comp.merge(np.zeros(comp.dim)), x)
    assert torch.equal(out, net(x))


@pytest.mark.parametrize("space", SPACES)
def test_one_hot_is_finetuned_model(zoo, space):
    net, fts, base, tvs, x = zoo
    comp = Composition(base, tvs, NAMES, space=space)
    for i, ft in enumerate(fts):
        out = functional_forward(net, comp.merge(comp.one_hot(i)), x)
        torch.testing.assert_close(out, ft(x), rtol=1e-6, atol=1e-6)
        lam = comp.expand(comp.one_hot(i))
        assert lam[i].min() == 1.0 and np.abs(np.delete(lam, i, axis=0)).max() == 0.0


@pytest.mark.parametrize("space", SPACES)
def test_isotropic_is_task_arithmetic(zoo, space):
    _, _, base, tvs, _ = zoo
    comp = Composition(base, tvs, NAMES, space=space)
    alpha = 0.35
    merged = comp.merge(comp.isotropic(alpha))
    for k in base:
        expected = base[k] + alpha * sum(tv[k] for tv in tvs)
        torch.testing.assert_close(merged[k], expected, rtol=1e-6, atol=1e-6)
    assert np.allclose(comp.expand(comp.isotropic(alpha)), alpha)


def test_dims_labels_and_layout(zoo):
    _, _, base, tvs, _ = zoo
    T, B = len(NAMES), len(base)  # 6 blocks: 3 layers × (weight, bias)
    assert B == 6
    dims = {"per_task": T, "per_layer": T * 3, "per_block": T * B, "per_partition:3": T * B * 3,
            "per_partition:7": T * B * 7}
    for space, dim in dims.items():
        comp = Composition(base, tvs, NAMES, space=space)
        assert (comp.dim, comp.T, comp.B, comp.space) == (dim, T, B, space)
        assert len(comp.labels) == dim == len(set(comp.labels))
    comp = Composition(base, tvs, NAMES, space="per_layer")
    assert comp.groups == ["0", "1", "2"]
    assert comp.labels[:4] == ["fashion/0", "fashion/1", "fashion/2", "digits/0"]
    assert Composition(base, tvs, NAMES, space="per_task").labels == NAMES
    comp = Composition(base, tvs, NAMES, space="per_block")
    assert comp.blocks == list(base) and comp.labels[B + 1] == "digits/0.bias"
    # Task-major layout: coordinate (task 1, block 1) changes only that coefficient.
    x = np.zeros(comp.dim)
    x[B + 1] = 2.0
    lam = comp.coefficients(torch.tensor(x)).numpy()
    assert lam[1, 1] == 2.0 and np.count_nonzero(lam) == 1
    comp = Composition(base, tvs, NAMES, space="per_partition:2")
    assert comp.labels[:3] == ["fashion/0.weight#0", "fashion/0.weight#1", "fashion/0.bias#0"]
    assert comp.coefficients(torch.zeros(comp.dim)).shape == (T, B, 2)
    # per_layer maps each coordinate to every block of its layer.
    comp = Composition(base, tvs, NAMES, space="per_layer")
    lam = comp.expand(np.arange(comp.dim, dtype=float))
    assert lam.shape == (T, B)
    assert lam[2].tolist() == [6, 6, 7, 7, 8, 8]


@pytest.mark.parametrize("space", SPACES)
def test_gradient_matches_finite_differences(space):
    net = tiny_net(dtype=torch.float64)
    fts = finetune_copies(net, 2)
    base = dict(net.state_dict())
    tvs = [task_vector(base, ft.state_dict()) for ft in fts]
    comp = Composition(base, tvs, ["a", "b"], space=space, dtype=torch.float64)
    inp = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def loss(x):
        return functional_forward(net, comp.merge(x), inp).pow(2).mean()

    x0 = torch.randn(comp.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 0.5
    x = x0.clone().requires_grad_(True)
    loss(x).backward()
    eps = 1e-6
    fd = torch.zeros(comp.dim, dtype=torch.float64)
    for j in range(comp.dim):
        e = torch.zeros(comp.dim, dtype=torch.float64)
        e[j] = eps
        fd[j] = (loss(x0 + e) - loss(x0 - e)) / (2 * eps)
    assert x.grad.abs().max() > 1e-4
    torch.testing.assert_close(x.grad, fd, rtol=1e-5, atol=1e-8)
    # Nothing but x receives a gradient.
    assert all(not t.requires_grad for t in comp.tau) and all(p.grad is None for p in net.parameters())


def test_partitions_include_1d_blocks_and_follow_the_seed(zoo):
    _, _, base, tvs, _ = zoo
    K = 3
    comp = Composition(base, tvs, NAMES, space=f"per_partition:{K}", seed=5)
    assert [tuple(p.shape) for p in comp.partitions] == [tuple(base[b].shape) for b in comp.blocks]
    same = Composition(base, tvs, NAMES, space=f"per_partition:{K}", seed=5)
    other = Composition(base, tvs, NAMES, space=f"per_partition:{K}", seed=6)
    assert all(torch.equal(a, b) for a, b in zip(comp.partitions, same.partitions))
    assert any(not torch.equal(a, b) for a, b in zip(comp.partitions, other.partitions))
    # A 1-D block (the LayerNorm bias, 8 elements) has its own coefficients: setting partition k
    # of task 1 moves exactly the elements assigned to k, by τ.
    b = comp.blocks.index("1.bias")
    assign = comp.partitions[b].long()
    k = int(assign[0])
    x = np.zeros(comp.dim)
    x[(1 * comp.B + b) * K + k] = 1.0
    merged = comp.merge(x)
    mask = assign == k
    assert len(assign.unique()) > 1  # so the check below also covers elements left untouched
    delta = merged["1.bias"] - base["1.bias"]
    torch.testing.assert_close(delta[mask], tvs[1]["1.bias"][mask])
    assert torch.all(delta[~mask] == 0)
    assert all(torch.equal(merged[n], base[n]) for n in comp.blocks if n != "1.bias")


def test_fp16_storage_is_close_to_fp32(zoo):
    net, _, base, tvs, x = zoo
    c32 = Composition(base, tvs, NAMES, space="per_block", dtype=torch.float32)
    c16 = Composition(base, tvs, NAMES, space="per_block", dtype=torch.float16)
    assert c16.memory_bytes() * 2 == c32.memory_bytes() == 4 * len(NAMES) * sum(v.numel() for v in base.values())
    coef = np.random.default_rng(0).uniform(-1, 1, c32.dim)
    m32, m16 = c32.merge(coef), c16.merge(coef)
    for k in base:
        assert m16[k].dtype == torch.float32
        torch.testing.assert_close(m16[k], m32[k], rtol=0, atol=2e-3)
    torch.testing.assert_close(functional_forward(net, m16, x), functional_forward(net, m32, x),
                               rtol=0, atol=5e-3)


def test_batchnorm_running_stats_are_not_merged():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)).eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    ft = copy.deepcopy(net)
    with torch.no_grad():
        for t in ft.state_dict().values():
            if t.is_floating_point():
                t.add_(0.5)
    base = dict(net.state_dict())
    buffers_before = {k: v.clone() for k, v in net.named_buffers()}
    tvs = [task_vector(base, ft.state_dict())]
    assert "1.num_batches_tracked" not in tvs[0] and "1.running_mean" in tvs[0]
    comp = Composition(base, tvs, ["t"], space="per_block")
    merged = comp.merge(comp.one_hot(0))
    x = torch.randn(5, 4)
    out = functional_forward(net, merged, x)
    # Expected: the fine-tuned weights with the *base* running statistics.
    expected = copy.deepcopy(ft)
    expected[1].running_mean.copy_(net[1].running_mean)
    expected[1].running_var.copy_(net[1].running_var)
    torch.testing.assert_close(out, expected(x))
    assert not torch.allclose(out, ft(x))
    for k, v in net.named_buffers():
        assert torch.equal(v, buffers_before[k])


def test_layer_of():
    assert layer_of("transformer.resblocks.3.attn.in_proj_weight") == "resblocks.3"
    assert layer_of("blocks.2.conv.weight") == "blocks.2"
    assert layer_of("_blocks.11.bn.weight") == "_blocks.11"
    assert layer_of("encoder.layers.0.mlp.fc1.weight") == "layers.0"
    assert layer_of("encoder.layer.10.output.dense.bias") == "layer.10"
    assert layer_of("conv_head.weight") == "conv_head"
    assert layer_of("ln_post.weight") == "ln_post"
    assert layer_of("weight") == "weight"
    assert layer_of("blocks.weight") == "blocks"


def test_parse_space():
    assert parse_space("per_task") == ("per_task", 1)
    assert parse_space("per_block") == ("per_block", 1)
    assert parse_space("per_partition:4") == ("per_partition", 4)
    for bad in ["per_tensor", "per_partition", "per_partition:1", "per_partition:x", ""]:
        with pytest.raises(HarnessError) as err:
            parse_space(bad)
        msg = str(err.value)
        assert "\n" not in msg and "per_block" in msg and "per_partition:K" in msg and repr(bad) in msg


def test_mismatched_task_vectors_are_named(zoo):
    _, _, base, tvs, _ = zoo
    missing = dict(tvs[1])
    del missing["2.weight"]
    with pytest.raises(HarnessError, match=r"^task 'digits': block '2\.weight' is missing"):
        Composition(base, [tvs[0], missing], NAMES[:2])
    wrong = dict(tvs[1])
    wrong["0.weight"] = torch.zeros(5, 8)
    with pytest.raises(HarnessError) as err:
        Composition(base, [tvs[0], wrong], NAMES[:2])
    assert str(err.value) == "task 'digits': block '0.weight' has shape (5, 8), expected (8, 5)"
    extra = dict(tvs[0], **{"head.weight": torch.zeros(2)})
    with pytest.raises(HarnessError, match="'head.weight' is not a floating block"):
        Composition(base, [extra], NAMES[:1])
    with pytest.raises(HarnessError, match="2 task vectors but 1 task names"):
        Composition(base, tvs[:2], NAMES[:1])
    with pytest.raises(HarnessError, match="unknown coefficient space"):
        Composition(base, tvs, NAMES, space="per_partition:1")
    comp = Composition(base, tvs, NAMES)
    with pytest.raises(HarnessError, match="has 4 entries"):
        comp.merge(np.zeros(4))


def test_integer_buffers_are_skipped():
    base = {"w": torch.ones(3), "steps": torch.tensor(5)}
    ft = {"w": torch.full((3,), 3.0), "steps": torch.tensor(9)}
    tv = task_vector(base, ft)
    assert list(tv) == ["w"] and torch.equal(tv["w"], torch.full((3,), 2.0))
    comp = Composition(base, [tv], ["t"], space="per_task")
    assert comp.blocks == ["w"]
    assert torch.equal(comp.merge(np.array([0.5]))["w"], torch.full((3,), 2.0))
