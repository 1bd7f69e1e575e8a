"""LoRA task vectors in factor form (the paper's Table 4): A and B composed separately,
ΔW = (Σ λ_B B)(Σ λ_A A); LoRA fine-tuning of a zoo; the ``lora_form`` task option."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.api import Candidate, HarnessError
from harness.config import RunConfig, build_config
from harness.lora import FactorComposition
from harness.problem import build_task, plan

SMALL_LORA_ZOO = "datasets=skdigits,lfw;max_n=400;pretrain_steps=40;ft_steps=15;ft_mode=lora;ft_rank=2;ft_lr=0.02"


def _factors(T=3, seed=0, dtype=torch.float64):
    """A base of two matrices (one 4×3, one conv kernel 2×3×1×1 = (2, 3)) and a bias, and T
    random rank-2 adapters of both matrices."""
    gen = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(4, 3, generator=gen, dtype=dtype), "b": torch.randn(4, generator=gen, dtype=dtype),
            "conv.weight": torch.randn(2, 3, 1, 1, generator=gen, dtype=dtype)}
    factors = [{"w": (torch.randn(2, 3, generator=gen, dtype=dtype), torch.randn(4, 2, generator=gen, dtype=dtype)),
                "conv.weight": (torch.randn(2, 3, generator=gen, dtype=dtype), torch.randn(2, 2, generator=gen, dtype=dtype))}
               for _ in range(T)]
    return base, factors


def test_merge_is_the_product_of_the_composed_factors():
    base, factors = _factors()
    comp = FactorComposition(base, factors, ["a", "b", "c"], dtype=torch.float64)
    assert comp.dim == 3 * 2 * 2 and comp.labels[:4] == ["a/w.A", "a/w.B", "a/conv.weight.A", "a/conv.weight.B"]
    x = np.random.default_rng(1).uniform(-1, 1, comp.dim)
    merged = comp.merge(x)
    lam = x.reshape(3, 2, 2)
    for j, name in enumerate(["w", "conv.weight"]):
        a = sum((1 + lam[t, j, 0]) * factors[t][name][0] for t in range(3))
        bm = sum(lam[t, j, 1] * factors[t][name][1] for t in range(3))
        torch.testing.assert_close(merged[name], base[name] + (bm @ a).view(base[name].shape))
    assert torch.equal(merged["b"], base["b"])  # no adapter touches the bias
    # The cross terms: with two adapters at λ = 1 the update is (B1 + B2)(A1 + A2), not B1A1 + B2A2.
    both = np.zeros((3, 2, 2))
    both[2, :, 0] = -1
    both[:2, :, 1] = 1
    w = comp.merge(both.reshape(-1))["w"] - base["w"]
    (a1, b1), (a2, b2) = factors[0]["w"], factors[1]["w"]
    torch.testing.assert_close(w, (b1 + b2) @ (a1 + a2))
    assert not torch.allclose(w, b1 @ a1 + b2 @ a2)


def test_zero_is_pretrained_one_hot_is_each_adapter_and_the_isotropic_line():
    base, factors = _factors()
    comp = FactorComposition(base, factors, ["a", "b", "c"], dtype=torch.float64)
    zero = comp.merge(np.zeros(comp.dim))
    assert all(torch.equal(zero[k], base[k]) for k in base)
    for i in range(3):
        m = comp.merge(comp.one_hot(i))
        for k, (a, bm) in factors[i].items():
            torch.testing.assert_close(m[k], base[k] + (bm @ a).view(base[k].shape))
    single = FactorComposition(base, factors[:1], ["a"], dtype=torch.float64)
    a, bm = factors[0]["w"]
    torch.testing.assert_close(single.merge(single.isotropic(0.3))["w"], base["w"] + 0.3 * bm @ a)
    lam = comp.expand(comp.one_hot(1))
    assert lam.shape == (3, 3, 2) and lam[1, 0].tolist() == [1, 1] and not lam[0].any() and not lam[:, 1].any()


def test_gradient_matches_finite_differences_and_is_not_zero_at_the_start():
    base, factors = _factors()
    comp = FactorComposition(base, factors, ["a", "b", "c"], dtype=torch.float64)
    probe = torch.randn(4, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def loss(x):
        m = comp.merge(x)
        return (torch.tanh(m["w"]) * probe).sum() + (m["conv.weight"] ** 2).sum()
    x0 = torch.zeros(comp.dim, dtype=torch.float64)
    x = x0.clone().requires_grad_(True)
    loss(x).backward()
    fd = torch.stack([(loss(x0 + e) - loss(x0 - e)) / 2e-6 for e in torch.eye(comp.dim, dtype=torch.float64) * 1e-6])
    torch.testing.assert_close(x.grad, fd, rtol=1e-5, atol=1e-8)
    g = x.grad.view(3, 2, 2)
    assert g[..., 1].abs().min() > 0 and g[..., 0].abs().max() == 0  # at x = 0 only B moves the model


def test_like_reuses_unchanged_blocks_and_per_layer_shares_a_layer():
    base, factors = _factors()
    comp = FactorComposition(base, factors, ["a", "b", "c"], dtype=torch.float64)
    x = np.random.default_rng(2).uniform(-1, 1, comp.dim)
    first = comp.merge(x)
    y = x.copy()
    y[3] += 0.5  # task a, conv.weight's B
    again = comp.merge(y, like=(comp.coefficients(x), first))
    assert again["w"] is first["w"] and again["conv.weight"] is not first["conv.weight"]
    torch.testing.assert_close(again["conv.weight"], comp.merge(y)["conv.weight"])
    layered = FactorComposition(base, factors, ["a", "b", "c"], space="per_layer", dtype=torch.float64)
    assert layered.groups == ["w", "conv"] and layered.dim == 12


def test_bad_factors_and_spaces_are_one_line_errors():
    base, factors = _factors(T=2)
    with pytest.raises(HarnessError, match="compose in per_block or per_layer, not 'per_task'"):
        FactorComposition(base, factors, ["a", "b"], space="per_task")
    bad = [factors[0], {**factors[1], "w": (torch.randn(3, 3), torch.randn(4, 2))}]
    with pytest.raises(HarnessError, match=r"factors of 'w' in 'b' have shapes A \(3, 3\), B \(4, 2\); expected A \(r, 3\)"):
        FactorComposition(base, bad, ["a", "b"])
    with pytest.raises(HarnessError, match="lacks|base model lacks"):
        FactorComposition(base, [{"nope": factors[0]["w"]}], ["a"])


def test_adapters_of_different_ranks_and_blocks_compose_zero_padded():
    """Adapter a: rank 2 on w and conv; b: rank 3 on w only; c: rank 1 on conv only. Each alone is
    its own B·A, zero is θ0, coefficients exist only where an adapter touches a block, and the
    cross terms pair the leading min(r_s, r_t) rank components."""
    base, two = _factors(T=1)
    gen = torch.Generator().manual_seed(5)
    f_b = {"w": (torch.randn(3, 3, generator=gen, dtype=torch.float64), torch.randn(4, 3, generator=gen, dtype=torch.float64))}
    f_c = {"conv.weight": (torch.randn(1, 3, generator=gen, dtype=torch.float64),
                           torch.randn(2, 1, generator=gen, dtype=torch.float64))}
    factors = [two[0], f_b, f_c]
    comp = FactorComposition(base, factors, ["a", "b", "c"], dtype=torch.float64)
    assert comp.dim == 2 * 4 and comp.labels == ["a/w.A", "a/w.B", "a/conv.weight.A", "a/conv.weight.B",
                                                 "b/w.A", "b/w.B", "c/conv.weight.A", "c/conv.weight.B"]
    zero = comp.merge(np.zeros(comp.dim))
    assert all(torch.equal(zero[k], base[k]) for k in base)
    for i, f in enumerate(factors):
        m = comp.merge(comp.one_hot(i))
        for k in ("w", "conv.weight"):
            want = base[k] + (f[k][1] @ f[k][0]).view(base[k].shape) if k in f else base[k]
            torch.testing.assert_close(m[k], want)
    # a and b together on w: (B_a + B_b[:, :2]) (A_a + A_b[:2]) + B_b[:, 2:] A_b[2:].
    x = np.zeros(comp.dim)
    x[[1, 5]] = 1.0          # λ_B = 1 for a and b on w; λ_A = 1 everywhere (x_A = 0)
    x[3] = 0.0               # a's conv: λ_B = 0, so conv is c's only if c's λ_B is set
    x[7] = 1.0               # c's conv
    w = comp.merge(x)["w"] - base["w"]
    (a_a, b_a), (a_b, b_b) = two[0]["w"], f_b["w"]
    torch.testing.assert_close(w, (b_a + b_b[:, :2]) @ (a_a + a_b[:2]) + b_b[:, 2:] @ a_b[2:])
    conv = comp.merge(x)["conv.weight"] - base["conv.weight"]
    (a_a, b_a), (a_c, b_c) = two[0]["conv.weight"], f_c["conv.weight"]
    torch.testing.assert_close(conv.view(2, 3), b_c @ (a_a[:1] + a_c))  # cross term through a's A
    lam = comp.expand(comp.one_hot(1))
    assert lam[1, 0].tolist() == [1, 1] and not lam[1, 1].any() and not lam[2].any()
    layered = FactorComposition(base, factors, ["a", "b", "c"], space="per_layer", dtype=torch.float64)
    assert layered.dim == 8 and layered.labels[4:] == ["b/w.A", "b/w.B", "c/conv.A", "c/conv.B"]
    xg = torch.zeros(comp.dim, dtype=torch.float64, requires_grad=True)
    comp.merge(xg)["w"].sum().backward()
    assert xg.grad[[1, 5]].abs().min() > 0 and xg.grad[[3, 7]].abs().max() == 0


def test_lora_zoo_factors_round_trip_and_runs_compose_them(cache_dir, tmp_path):
    """A zoo fine-tuned as rank-2 LoRA adapters stores dense updates equal to B·A and the factors
    themselves; lora_form=factors scores one_hot(i) as fine-tuned model i, and a gradient run moves
    both A's and B's coefficients."""
    from harness.runner import run
    from harness.sources.cache import get_zoo
    opts = dict(p.split("=") for p in SMALL_LORA_ZOO.split(";"))
    src = get_zoo("tiny-clip", cache_dir=cache_dir, progress=False, **{k: v for k, v in opts.items()})
    again = get_zoo("tiny-clip", cache_dir=cache_dir, progress=False, **{k: v for k, v in opts.items()})
    assert src.meta["fine_tuning"] == "lora:2" and set(src.lora_factors) == {"skdigits", "lfw"}
    for ds in src.lora_factors:  # the adapters learned their data sets
        assert src.meta["finetuned_acc"][ds] > src.meta["zero_shot_acc"][ds], (ds, src.meta["finetuned_acc"], src.meta["zero_shot_acc"])
    for ds, f in src.lora_factors.items():
        assert f and all(a.shape[0] == 2 and b.shape[1] == 2 for a, b in f.values())
        for k, (a, b) in f.items():
            torch.testing.assert_close(src.task_vectors[ds][k], (b @ a).view(src.base[k].shape))
            assert torch.equal(again.lora_factors[ds][k][1], b)
        untouched = [k for k in src.base if k not in f]
        assert untouched and all(not src.task_vectors[ds][k].any() for k in untouched)

    def task(form, space="per_block"):
        return build_task(plan(RunConfig(task="addition", searcher="gradient", space=space, seed=0, cache_dir=cache_dir,
                                         quiet=True, task_options={"source": "tiny-clip", "source_options": SMALL_LORA_ZOO,
                                                                   "search_n": 32, "lora_form": form})))[0]
    dense, fact = task("dense"), task("factors")
    assert isinstance(fact.comp, FactorComposition) and fact.comp.memory_bytes() < dense.comp.memory_bytes()
    for i in range(2):  # adapter i alone scores as the dense task vector i alone
        a, b = dense.evaluate([Candidate(x=dense.comp.one_hot(i))])[0], fact.evaluate([Candidate(x=fact.comp.one_hot(i))])[0]
        assert b.loss == pytest.approx(a.loss, abs=1e-4)
    neg = build_task(plan(RunConfig(task="negation", searcher="gradient", space="per_block", seed=0, cache_dir=cache_dir,
                                    quiet=True, task_options={"source": "tiny-clip", "source_options": SMALL_LORA_ZOO,
                                                              "search_n": 32, "target": "skdigits", "control": "lfw",
                                                              "lora_form": "factors"})))[0]
    merged = neg.comp.merge(neg.comp.one_hot(0))
    for k, (a, b) in src.lora_factors["skdigits"].items():  # negation composes −τ: B is negated
        torch.testing.assert_close(merged[k], src.base[k] - (b @ a).view(src.base[k].shape))
    rec = run(build_config({"task": "addition", "searcher": "gradient", "space": "per_block", "budget": 6, "seed": 0,
                            "searcher_options": {"lr": 0.05}, "cache_dir": cache_dir, "quiet": True,
                            "results_dir": str(tmp_path),
                            "task_options": {"source": "tiny-clip", "source_options": SMALL_LORA_ZOO, "search_n": 32,
                                             "lora_form": "factors"}}))
    assert rec["status"] == "complete"
    from harness.results import load_coefficients
    saved = load_coefficients(rec["coefficients"])
    x = saved["x"].reshape(2, -1, 2)
    assert np.abs(x[..., 0]).max() > 0 and np.abs(x[..., 1]).max() > 0
    assert saved["coefficients"].shape == (2, len(fact.comp.blocks), 2)  # λ_A, λ_B of every block


def test_lora_form_options_are_checked_and_neutral():
    def cfg(space="per_block", **opts):
        return plan(build_config({"task": "addition", "searcher": "nevergrad", "space": space, "task_options": opts}))
    assert cfg().config.run_id() == cfg(lora_form="dense").config.run_id() != cfg(lora_form="factors").config.run_id()
    with pytest.raises(HarnessError, match="per_block or per_layer .* not per_task"):
        cfg(space="per_task", lora_form="factors")
    with pytest.raises(HarnessError, match="does not combine with transform=ties"):
        cfg(lora_form="factors", transform="ties")
    with pytest.raises(HarnessError, match="lora_form"):
        cfg(lora_form="both")
