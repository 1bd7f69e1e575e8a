"""Prefix reuse (harness/engines/prefix.py): a candidate that changes only later stages of a staged
tail is scored from a kept anchor's activations, with exactly the scores of the full forward."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import harness
from harness.api import Candidate
from harness.config import resolve_options
import harness.engines.prefix as prefix_module
from harness.engines.prefix import PrefixCache, _Chain, stages_of
from harness.evaluators import LocalEvaluator
from harness.registry import load
from harness.sources.effnet import effnet_parts

# The conformance suite's small effnet zoo: the same options reuse the session's cached build.
EFFNET = "datasets=skdigits,lfw;max_n=300;head_steps=30;ft_steps=4;ft_batch_size=32;threads=1"


def chain_all(tail, x):
    """The features of ``x`` through the stage chain, and the state entering every stage."""
    traces = [[]]
    return _Chain(tail)([x], 0, traces)[0], traces[0]


def test_the_staged_effnet_tail_is_its_blocks_bit_for_bit():
    prefix, tail, _ = effnet_parts(13)
    with torch.no_grad():
        h = prefix(torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
        ref = h
        for block in tail._blocks.values():
            ref = block(ref)
        ref = tail._swish(tail._bn1(tail._conv_head(ref))).mean((2, 3))
        z, trace = chain_all(tail, h)
        assert torch.equal(z, ref) and torch.equal(tail(h), ref)
        assert len(trace) == 20  # 3 blocks × 6 stages + the head's 2
        for s in range(len(trace)):  # every stage restarts from its recorded state exactly
            assert torch.equal(_Chain(tail)([trace[s]], s)[0], z)
    stages = [prefixes for prefixes, _ in stages_of(tail)]
    assert stages[0] == ["_blocks.13._expand_conv"] and stages[-1] == ["_bn1"]


def test_the_staged_open_clip_vit_is_its_forward_bit_for_bit(tiny_open_clip):
    model, _ = tiny_open_clip
    visual = model.visual
    assert stages_of(visual) is not None and len(stages_of(visual)) == len(visual.transformer.resblocks) + 2
    with torch.no_grad():
        x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        z, trace = chain_all(visual, x)
        assert torch.equal(z, visual(x))
        for s in range(len(trace)):
            assert torch.equal(_Chain(visual)([trace[s]], s)[0], z)
    assert stages_of(torch.nn.Linear(2, 2)) is None


def test_an_incremental_merge_is_the_full_merge(cache_dir):
    task = build(cache_dir)
    comp = task.engine.comp
    rng = np.random.default_rng(3)
    a = torch.as_tensor(rng.uniform(-0.5, 0.5, comp.dim), dtype=torch.float32)
    b = a.clone()
    b[[2, 40]] += 0.1
    full_a, full_b = comp.merge(a), comp.merge(b)
    inc = comp.merge(b, like=(comp.coefficients(a), full_a))
    assert inc.keys() == full_b.keys() and all(torch.equal(inc[k], full_b[k]) for k in inc)
    same = [k for k in inc if inc[k] is full_a[k]]
    assert len(same) == len(inc) - 2  # only the two changed blocks were merged again


TINY_CLIP = "datasets=skdigits,lfw;max_n=400;pretrain_steps=40;ft_steps=15"  # test_dfo_gn's zoo


def build(cache_dir, source="effnet", **extra):
    cls = load("task", "addition")
    zoo = EFFNET if source == "effnet" else TINY_CLIP
    opts = resolve_options(cls, {"source": source, "source_options": zoo, "search_n": 16, **extra}, "task")
    task = cls(opts, space="per_block", seed=0, cache_dir=cache_dir)
    task.setup("cpu")
    return task


@pytest.mark.parametrize("source", ["effnet", "tiny-clip"])  # an EfficientNet tail and an open_clip ViT
def test_probes_from_the_kept_anchor_score_like_the_full_forward(cache_dir, source):
    on, off = build(cache_dir, source), build(cache_dir, source, prefix_cache="off")
    dim, blocks = on.space().dim, len(on.engine.comp.blocks)
    anchor = np.random.default_rng(0).uniform(-0.3, 0.6, dim)
    # Probes of the first task vector's first, middle and last block (per_block: x is task-major).
    picks = [0, blocks // 2, blocks - 1]
    probes = []
    for i in picks:
        x = anchor.copy()
        x[i] += 0.05
        probes.append(x)
    cands = lambda: ([Candidate(x=anchor, outputs=True, anchor=True)]
                     + [Candidate(x=x, outputs=True) for x in probes] + [Candidate(x=anchor.copy(), outputs=True)])
    got, ref = LocalEvaluator(on).evaluate(cands()), LocalEvaluator(off).evaluate(cands())
    for g, r in zip(got, ref):
        assert g.loss == r.loss and g.metrics == r.metrics
        assert np.array_equal(g.outputs.flat(), r.outputs.flat())
    cache = on.engine.prefix
    name = on.engine.comp.blocks
    stage = [next(s for s, names in enumerate(cache.stages) if name[i] in names) for i in picks]
    assert stage[0] == 0 and 0 < stage[1] < stage[2] == len(cache.stages) - 1
    # every probe past the first stage and the anchor itself start from the kept state
    assert cache.stats["kept"] == 1 and cache.stats["reused"] == 3
    assert off.engine.prefix.stats["kept"] == off.engine.prefix.stats["reused"] == 0
    assert got[1].loss != got[0].loss and got[2].loss != got[0].loss and got[4].loss == got[0].loss


@pytest.mark.parametrize("source", ["effnet", "tiny-clip"])
def test_probes_scored_together_share_passes_and_score_like_one_by_one(cache_dir, source):
    """A batch of probes (dfo-gn with --batch-size) runs each probe's changed stage alone, then the
    later stages once for several probes: the same scores as one candidate at a time."""
    task = build(cache_dir, source)
    dim = task.space().dim
    anchor = np.random.default_rng(1).uniform(-0.3, 0.6, dim)
    probes = []
    for i in range(dim):
        x = anchor.copy()
        x[i] += 0.05
        probes.append(x)
    first = LocalEvaluator(task).evaluate([Candidate(x=anchor, outputs=True, anchor=True)])[0]
    alone = [LocalEvaluator(task).evaluate([Candidate(x=x, outputs=True)])[0] for x in probes]
    stats = task.engine.prefix.stats
    assert "batched" not in stats and stats["reused"] > 0
    reused, skipped = stats["reused"], stats["stages_skipped"]
    together = LocalEvaluator(task).evaluate([Candidate(x=x, outputs=True) for x in probes])
    for a, t in zip(alone, together):
        assert t.loss == pytest.approx(a.loss, rel=1e-6, abs=1e-7) and t.metrics == a.metrics
        np.testing.assert_allclose(t.outputs.flat(), a.outputs.flat(), rtol=1e-5, atol=1e-5)
    # the same probes start from the kept state, in fewer passes than probes
    assert stats["reused"] - reused == reused and stats["stages_skipped"] - skipped == skipped
    assert 0 < stats["batched"] < reused
    assert first.loss != together[-1].loss
    assert task.engine.prefix.batch_checked and "batch_off" not in stats


def test_probes_together_under_autocast_score_like_one_by_one(cache_dir):
    """Under -t precision=bf16 only the tail runs in bf16, in shared passes as one by one: the
    heads and losses stay fp32 on both paths."""
    task = build(cache_dir, precision="bf16")
    dim = task.space().dim
    anchor = np.random.default_rng(1).uniform(-0.3, 0.6, dim)
    probes = [anchor + 0.05 * np.eye(dim)[i] for i in range(dim)]
    LocalEvaluator(task).evaluate([Candidate(x=anchor, outputs=True, anchor=True)])
    assert task.engine.info["precision"]["used"] == "bf16"
    alone = [LocalEvaluator(task).evaluate([Candidate(x=x, outputs=True)])[0] for x in probes]
    together = LocalEvaluator(task).evaluate([Candidate(x=x, outputs=True) for x in probes])
    assert task.engine.prefix.stats["batched"] > 0
    for a, t in zip(alone, together):
        assert t.loss == pytest.approx(a.loss, rel=1e-6) and t.outputs.flat().dtype == a.outputs.flat().dtype


@pytest.mark.parametrize("fault", ["differs", "fails"])
def test_batched_probes_that_differ_past_rounding_or_fail_turn_batching_off(cache_dir, monkeypatch, fault):
    task = build(cache_dir)
    cache = task.engine.prefix
    dim = task.space().dim
    anchor = np.full(dim, 0.1)
    probes = [anchor + 0.05 * np.eye(dim)[i] for i in range(dim - 4, dim)]
    LocalEvaluator(task).evaluate([Candidate(x=anchor, outputs=True, anchor=True)])
    alone = [LocalEvaluator(task).evaluate([Candidate(x=x, outputs=True)])[0] for x in probes]
    stage = cache._run_stage
    off = lambda st: st * 1.01 if torch.is_tensor(st) else (off(st[0]), *st[1:])  # a 1 % error in every chunk
    if fault == "differs":
        monkeypatch.setattr(cache, "_run_stage", lambda *a: [off(st) for st in stage(*a)])
    else:  # e.g. states that do not hold the images first
        def fail(states):
            raise RuntimeError("Sizes of tensors must match")
        monkeypatch.setattr(prefix_module, "_cat", fail)
    together = LocalEvaluator(task).evaluate([Candidate(x=x, outputs=True) for x in probes])
    assert cache.stats["batch_off"].startswith("batched probes differ" if fault == "differs" else "shared passes failed")
    assert not cache.batchable
    assert [t.loss for t in together] == [a.loss for a in alone]  # scored one by one instead


def test_gradients_other_inputs_and_unstaged_tails_take_the_full_forward(cache_dir):
    task = build(cache_dir)
    eng = task.engine
    x = np.full(task.space().dim, 0.2)
    LocalEvaluator(task).evaluate([Candidate(x=x, anchor=True)])
    params, _ = eng.params(x, False)
    kept_x = eng.prefix.kept.x
    assert eng.prefix.reuse(params, kept_x[:-1], None) is None  # other inputs
    assert eng.prefix.reuse(params, kept_x + 1, None) is None
    assert eng.prefix.reuse(params, kept_x, torch.bfloat16) is None  # another precision
    before = dict(eng.prefix.stats)
    g = LocalEvaluator(task).evaluate([Candidate(x=x, grad=True)])[0]
    assert eng.prefix.stats == before and g.grad is not None and np.abs(g.grad).sum() > 0

    class Plain(torch.nn.Module):  # no stage_params: never cached
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))
    src = type("S", (), {"tail": Plain(), "linearized": False, "base": {"w": torch.ones(2)}})()
    assert not PrefixCache(src, None).enabled


def test_dfo_gn_runs_the_same_with_and_without_the_cache(cache_dir, tmp_path):
    runs = {}
    for pc in ("auto", "off"):
        runs[pc] = harness.run("addition", searcher="dfo-gn", space="per_block", seed=0, budget=64,
                               results_dir=str(tmp_path / pc), cache_dir=cache_dir, quiet=True,
                               task_options={"source": "effnet", "source_options": EFFNET, "search_n": 16,
                                             "prefix_cache": pc})
    a, b = (runs[k].trace for k in ("auto", "off"))
    assert len(a) == len(b) == 64
    assert a["loss"].tolist() == b["loss"].tolist()
    assert runs["auto"].score == runs["off"].score
    used = runs["auto"].record["task_info"]["prefix_cache"]
    # Every probe but those of the first convolution (one per task vector) starts from the anchor.
    assert used["kept"] >= 1 and used["reused"] >= 58 and "prefix_cache" not in (runs["off"].record["task_info"] or {})


def test_dfo_gn_with_a_batch_of_probes_traces_the_one_by_one_run(cache_dir, tmp_path):
    runs = {}
    for b in (1, 40):
        runs[b] = harness.run("addition", searcher="dfo-gn", space="per_block", seed=0, budget=64, batch_size=b,
                              results_dir=str(tmp_path / str(b)), cache_dir=cache_dir, quiet=True,
                              task_options={"source": "effnet", "source_options": EFFNET, "search_n": 16})
    a, b = (runs[k].trace for k in (1, 40))
    np.testing.assert_allclose(a["loss"].to_numpy(), b["loss"].to_numpy(), rtol=1e-6)
    assert runs[1].score == pytest.approx(runs[40].score, abs=1e-6)
    assert runs[40].record["task_info"]["prefix_cache"]["batched"] > 0


def test_bad_values_are_refused_before_anything_runs():
    from harness.api import HarnessError
    from harness.config import RunConfig
    from harness.problem import plan
    with pytest.raises(HarnessError, match="prefix_cache='bogus' is not one of auto, off"):
        plan(RunConfig(task="addition", searcher="dfo-gn", task_options={"prefix_cache": "bogus"}))
    for bad in (0.0, 1.5):
        with pytest.raises(HarnessError, match="refresh must be > 0, <= 1"):
            plan(RunConfig(task="addition", searcher="dfo-gn", searcher_options={"refresh": bad}))
