"""Linearised models (``-t linearize=true``), the tangent engine, and fine-tuning in the tangent space.

The linearised forward is checked against an independent computation of ``f(x; θ0) + J·Δθ``
(autograd's double-backward JVP and central finite differences, in fp64), for exact linearity in
the coefficients, and end to end: the tangent engine scores exactly what the direct linearised path
scores, and a checkpoint fine-tuned with ``finetune --mode linear`` round-trips into a run.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import harness
from harness.sources.cache import get_zoo
from harness.composition import Composition, functional_forward
from harness.sources.linear import LINEAR_METADATA, linearized, tangent_checkpoint, tangent_forward

ROOT = Path(__file__).resolve().parents[1]


class Block(nn.Module):
    """Attention, layer norm and a GELU MLP: the operations of a ViT block, in fp64."""

    def __init__(self, d=8):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.fc = nn.Sequential(nn.Linear(d, 16), nn.GELU(), nn.Linear(16, 4))

    def forward(self, x):
        h = self.ln(x)
        h = x + self.attn(h, h, h, need_weights=False)[0]
        return self.fc(h).mean(1)


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    m = Block().double().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    base = {k: v.clone() for k, v in m.named_parameters()}
    delta = {k: 0.1 * torch.randn_like(v) for k, v in base.items()}
    x = torch.randn(5, 3, 8, dtype=torch.float64)
    return m, base, delta, x


def test_linear_forward_equals_an_independent_jvp_and_finite_differences(block):
    m, base, delta, x = block
    got = tangent_forward(m, base, {k: base[k] + delta[k] for k in base}, x)
    f0 = functional_forward(m, base, x)
    # Autograd's JVP by double backward (reverse mode only), independent of torch.func.jvp.
    # (The fused attention kernels have no double backward: the math kernel does.)
    keys = list(base)
    with sdpa_kernel(SDPBackend.MATH):
        _, jv = torch.autograd.functional.jvp(lambda *p: functional_forward(m, dict(zip(keys, p)), x),
                                              tuple(base[k] for k in keys), tuple(delta[k] for k in keys))
    assert torch.allclose(got, f0 + jv, atol=1e-12, rtol=0)
    eps = 1e-5
    plus = functional_forward(m, {k: base[k] + eps * delta[k] for k in base}, x)
    minus = functional_forward(m, {k: base[k] - eps * delta[k] for k in base}, x)
    assert torch.allclose(got, f0 + (plus - minus) / (2 * eps), atol=1e-8, rtol=0)
    assert (got - functional_forward(m, {k: base[k] + delta[k] for k in base}, x)).abs().max() > 1e-4  # not the model


def test_linear_forward_is_exactly_linear_in_the_coefficients_and_differentiable(block):
    m, base, delta, x = block
    comp = Composition(base, [delta, {k: -v for k, v in delta.items()}], ["a", "b"], space="per_block",
                       dtype=torch.float64)
    f0 = functional_forward(m, base, x)
    rng = np.random.default_rng(0)
    x1, x2 = rng.normal(size=comp.dim), rng.normal(size=comp.dim)
    out = {k: tangent_forward(m, base, comp.merge(torch.as_tensor(v)), x) - f0
           for k, v in (("1", x1), ("2", x2), ("mix", 0.3 * x1 - 2.0 * x2))}
    assert torch.allclose(out["mix"], 0.3 * out["1"] - 2.0 * out["2"], atol=1e-12, rtol=0)
    lam = torch.as_tensor(x1).requires_grad_(True)
    tangent_forward(m, base, comp.merge(lam), x).sum().backward()
    # The gradient of a linear function: its value at each unit vector.
    unit = np.eye(comp.dim)
    want = [float((tangent_forward(m, base, comp.merge(torch.as_tensor(e)), x) - f0).sum()) for e in unit]
    assert np.allclose(lam.grad.numpy(), want, atol=1e-10)


def test_linearized_source_recomputes_the_fine_tuned_references(cache_dir):
    import dataclasses
    std = get_zoo("tiny-clip", cache_dir=cache_dir, progress=False)
    post_hoc = linearized(std, cache_dir)   # standard task vectors: the standard fine-tuned models stay the references
    assert post_hoc.linearized and post_hoc.meta["finetuned_acc"] == std.meta["finetuned_acc"]
    assert "finetuned_acc_standard" not in post_hoc.meta
    # Task vectors fine-tuned in the tangent space: their fine-tuned models are the linearised ones.
    src = dataclasses.replace(std, meta=dict(std.meta, fine_tuning="linear"))
    lin = linearized(src, cache_dir)
    assert lin.linearized and not src.linearized and lin.meta["linearized"]
    assert lin.meta["zero_shot_acc"] == src.meta["zero_shot_acc"]        # Δθ = 0: the same model
    assert lin.meta["finetuned_acc_standard"] == src.meta["finetuned_acc"]
    assert lin.meta["finetuned_acc"] != src.meta["finetuned_acc"]
    ds = src.datasets[0]
    assert lin.meta["finetuned_acc"][ds] == pytest.approx(lin.accuracy(lin.finetuned(ds), ds, "test"))
    assert linearized(src, cache_dir).meta["references_cached"]           # cached under its own key
    x = src.inputs[ds]["val"][:8]
    assert torch.equal(lin.features(src.base, x), src.features(src.base, x))


def _trace(run):
    return [(r["i"], round(r["loss"], 5)) for r in run.trace.to_dict("records")]


@pytest.mark.parametrize("searcher,space", [("nevergrad", "per_task"), ("gradient", "per_layer")])
def test_tangent_engine_scores_what_the_direct_linearised_path_scores(cache_dir, tmp_path, searcher, space):
    runs = {}
    for engine in ("local", "tangent"):
        runs[engine] = harness.run(task="addition", searcher=searcher, budget=12, space=space, seed=0, cache_dir=cache_dir,
                                   task_options={"source": "tiny-clip", "linearize": True, "engine": engine,
                                                 "datasets": ["fashion", "cvdigits", "lfw"]},
                                   results_dir=str(tmp_path / engine))
    local, tangent = runs["local"], runs["tangent"]
    assert _trace(local) == _trace(tangent) and len(_trace(local)) >= 12
    assert tangent.final["normalized_acc"] == pytest.approx(local.final["normalized_acc"], abs=1e-9)
    info = tangent.record["task_info"]["tangent"]
    assert info["sets"] >= 1 and info["cached_mb"] > 0 and not info["skipped"]
    assert local.references != {} and local.references == tangent.references


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_tangent_engine_needs_a_linearised_model(cache_dir, tmp_path):
    r = _cli("run", "--task", "addition", "--searcher", "task-arithmetic", "-t", "source=tiny-clip", "-t", "engine=tangent",
             "--cache-dir", cache_dir, "--results-dir", str(tmp_path))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: engine tangent scores linearised models only: add -t linearize=true (or use -t engine=local)"]
    r = _cli("run", "--task", "addition", "--searcher", "task-arithmetic", "-t", "source=tiny-clip", "-t", "engine=tangent",
             "-t", "linearize=true", "-t", "precision=bf16", "--cache-dir", cache_dir, "--results-dir", str(tmp_path))
    assert r.returncode == 2 and "engine tangent computes in fp32" in r.stderr


def test_tangent_fine_tuning_lowers_its_loss(cache_dir):
    from harness.finetune import finetune
    src = get_zoo("tiny-clip", cache_dir=cache_dir, progress=False)
    lin = linearized(src, references=False)
    losses = []
    tv = finetune(lin, "cvdigits", steps=40, batch_size=64, lr=1e-3, seed=0, progress=lambda s, l: losses.append(l))
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8])
    before = lin.accuracy(src.base, "cvdigits", "val")
    after = lin.accuracy({k: v + tv[k] for k, v in src.base.items()}, "cvdigits", "val")
    assert after > before + 0.05


def test_finetune_linear_writes_marked_checkpoints_a_linearised_run_reads(tiny_open_clip, cache_dir, tmp_path):
    _, folder = tiny_open_clip
    out = tmp_path / "ft"
    r = _cli("finetune", "--pretrained", f"local-dir:{folder}", "--datasets", "skdigits", "--out", str(out),
             "--steps", "100", "--batch-size", "32", "--lr", "1e-3", "--max-n", "300", "--mode", "linear")
    assert r.returncode == 0, r.stderr
    path = out / "skdigits.safetensors"
    assert tangent_checkpoint(path) and LINEAR_METADATA
    line = next(line for line in r.stdout.splitlines() if "test accuracy" in line)
    assert "(linearised)" in line and "-t linearize=true" in r.stdout
    before, after = (float(v) for v in line.split("test accuracy ")[1].split(" (")[0].split(" -> "))
    assert after > before   # (a random-weight model's tangent features learn slowly; the zoo test checks the loss)
    common = ("run", "--task", "addition", "--searcher", "task-arithmetic", "-t", f"pretrained=local-dir:{folder}",
              "-t", f"checkpoints={out}", "-t", "source_options=max_n=300", "--cache-dir", cache_dir)
    r = _cli(*common, "-t", "linearize=true", "--results-dir", str(tmp_path / "lin"))
    assert r.returncode == 0, r.stderr
    rec = json.loads(next((tmp_path / "lin").glob("runs/*/record.json")).read_text())
    assert rec["references"]["fine-tuned (each its own)"]["acc/skdigits"] == pytest.approx(after, abs=1e-4)
    r = _cli(*common, "--results-dir", str(tmp_path / "std"))   # without linearize: warned, not refused
    assert r.returncode == 0 and "fine-tuned in the tangent space" in r.stderr
