"""The ``lines`` coefficient space (LiNeS): two scalars, the scale of the first and of the last
layer, interpolated linearly over depth and shared by every task vector."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.api import HarnessError
from harness.composition import Composition, depth_of, parse_space

BLOCKS = ["conv1.weight", "positional_embedding", "transformer.resblocks.0.attn.weight",
          "transformer.resblocks.0.mlp.bias", "transformer.resblocks.1.mlp.weight",
          "transformer.resblocks.2.attn.weight", "ln_post.weight", "proj"]


def test_depth_follows_the_layer_index():
    # stem and embeddings at 0, resblocks 0/1/2 at 0, 0.5, 1, the final norm and projection with the last layer
    assert depth_of(BLOCKS) == [0, 0, 0, 0, 0.5, 1, 1, 1]
    assert depth_of(["a.weight", "b.weight", "b.bias", "c.weight"]) == [0, 0.5, 0.5, 1]   # no indexed layers
    assert depth_of(["w"]) == [0.0]


def test_lines_scales_every_task_vector_by_depth():
    base = {b: torch.zeros(2) for b in BLOCKS}
    tvs = [{b: torch.ones(2) for b in BLOCKS}, {b: 2 * torch.ones(2) for b in BLOCKS}]
    comp = Composition(base, tvs, ["a", "b"], space="lines")
    assert comp.dim == 2 and comp.labels == ["first", "last"] and parse_space("lines") == ("lines", 1)
    lam = comp.coefficients(np.array([0.2, 1.0]))
    expect = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.6, 1.0, 1.0, 1.0])
    assert torch.allclose(lam, expect.expand(2, -1))
    merged = comp.merge(np.array([0.2, 1.0]))
    assert torch.allclose(merged["transformer.resblocks.1.mlp.weight"], torch.full((2,), 0.6 * 3))
    # the all-ones vector is task arithmetic, as in every space
    assert torch.allclose(comp.coefficients(comp.isotropic(0.3)), torch.full((2, len(BLOCKS)), 0.3, dtype=torch.float32))
    x = torch.tensor([0.5, -0.5], requires_grad=True)
    sum(v.sum() for v in comp.merge(x).values()).backward()
    d = torch.tensor(depth_of(BLOCKS))
    assert torch.allclose(x.grad, torch.stack([(1 - d).sum(), d.sum()]) * 2 * 3)   # 2 entries, τ_a + τ_b = 3
    with pytest.raises(HarnessError, match="cannot hold one task vector alone"):
        comp.one_hot(0)


def test_a_run_searches_the_two_scalars(tmp_path, cache_dir):
    from harness.config import RunConfig
    from harness.runner import run
    opts = {"source": "tiny-clip", "source_options": "datasets=skdigits,lfw;max_n=400;pretrain_steps=40;ft_steps=15",
            "search_n": 32}
    rec = run(RunConfig(task="addition", searcher="nevergrad", space="lines", budget=12, seed=0, task_options=opts,
                        results_dir=str(tmp_path), cache_dir=cache_dir, quiet=True), log=lambda m: None)
    assert rec["status"] == "complete" and rec["config"]["space"] == "lines"
    from harness.results import load_coefficients
    saved = load_coefficients(rec["coefficients"])
    first, last = saved["x"]
    lam = saved["coefficients"]                      # (T, B): every task vector alike, linear in depth
    assert saved["x"].shape == (2,) and lam.shape[0] == 2 and np.allclose(lam[0], lam[1])
    assert np.isclose(lam[0].min(), min(first, last), atol=1e-6) and np.isclose(lam[0].max(), max(first, last), atol=1e-6)
