"""The test-time-adaptation baselines: norm-layer tuning (the ``norms`` space), SAR's reliable-sample
entropy and its optimiser (SAM steps, model recovery), on crafted inputs and end to end."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.api import Evaluation, HarnessError, Space
from harness.composition import Composition, is_norm_block

NAMES = {  # block → whether the norms space tunes it
    "transformer.resblocks.0.ln_1.weight": True, "ln_pre.bias": True, "vision_model.pre_layrnorm.weight": True,
    "vision_model.encoder.layers.0.layer_norm1.bias": True, "_blocks.13._bn0.weight": True, "_bn1.bias": True,
    "blocks.0.norm1.weight": True, "transformer.resblocks.0.attn.in_proj_bias": False,
    "transformer.resblocks.0.mlp.c_fc.bias": False, "class_embedding": False}


def test_norm_blocks_are_found_by_name():
    assert {n: is_norm_block(n, (4,)) for n in NAMES} == NAMES
    assert not is_norm_block("_blocks.13._bn0.weight", (4, 4))    # 1-D only


def test_norms_space_changes_only_the_norm_layers():
    base = {"ln_1.weight": torch.ones(3), "ln_1.bias": torch.zeros(3), "fc.weight": torch.ones(2, 3), "fc.bias": torch.zeros(2)}
    tvs = [{k: torch.full_like(v, 5.0) for k, v in base.items()}]
    comp = Composition(base, tvs, ["a"], space="norms")
    assert comp.dim == 6 and comp.labels[:2] == ["ln_1.weight[0]", "ln_1.weight[1]"]
    x = torch.arange(6, dtype=torch.float32, requires_grad=True)
    merged = comp.merge(x)
    assert merged["ln_1.weight"].tolist() == [1, 2, 3] and merged["ln_1.bias"].tolist() == [3, 4, 5]
    assert torch.equal(merged["fc.weight"], base["fc.weight"])       # no task vector takes part
    (merged["ln_1.weight"].sum() + 2 * merged["ln_1.bias"].sum()).backward()
    assert x.grad.tolist() == [1, 1, 1, 2, 2, 2]
    assert comp.expand(np.zeros(6)).shape == (1, 4) and not comp.expand(np.ones(6)).any()
    with pytest.raises(HarnessError, match="holds no task vector"):
        comp.isotropic(0.3)
    with pytest.raises(HarnessError, match="none of the 1 composed blocks is one"):
        Composition({"fc.weight": torch.ones(2, 2)}, [{"fc.weight": torch.ones(2, 2)}], ["a"], space="norms")


def test_norms_space_is_for_test_time_adaptation():
    from harness.config import build_config
    from harness.problem import plan
    with pytest.raises(HarnessError, match="--space norms .* use it with --task tta, not addition"):
        plan(build_config({"task": "addition", "searcher": "gradient", "space": "norms"}))
    assert plan(build_config({"task": "tta", "searcher": "sar"})).config.space == "norms"
    for task in ("addition", "negation"):  # the LoRA baseline space likewise fine-tunes, it composes nothing
        with pytest.raises(HarnessError, match=f"--space lora:2 fine-tunes LoRA adapters .*; {task} composes"):
            plan(build_config({"task": task, "searcher": "gradient", "space": "lora:2"}))
    assert plan(build_config({"task": "few_shot", "searcher": "gradient", "space": "lora:2"})).config.space == "lora:2"


def test_reliable_filter_on_crafted_logits():
    from atlas_harness_tasks.tta import reliable
    # 4 classes, ln 4 = 1.386; the filter at 0.4 keeps entropies below 0.555.
    # Entropies: ≈ 0.011, ln 4 = 1.386 (uniform), ≈ 1.06 (two classes tied), ≈ 0.12.
    logits = torch.tensor([[8.0, 0, 0, 0], [0.0, 0, 0, 0], [2.0, 2, 0, 0], [6.0, 2, 0, 0]])
    e, keep = reliable(logits, 0.4)
    assert torch.allclose(e[1], torch.tensor(np.log(4), dtype=torch.float32))
    assert e[2].item() == pytest.approx(1.06, abs=0.01) and e[3].item() == pytest.approx(0.12, abs=0.01)
    assert keep.tolist() == [True, False, False, True]
    assert reliable(logits, 0.8)[1].tolist() == [True, False, True, True]   # 0.8 · ln 4 = 1.11
    assert reliable(logits, 0.0)[1].all()


def _sar(**kw):
    import harness.registry as registry
    cls = registry.load("searcher", "sar")
    opts = cls.Options(**{"validate_every": 0, **kw})
    return cls(Space(dim=2, lower=-5, upper=5), 100, 1, 0, opts)


def test_sar_takes_sharpness_aware_steps():
    """Loss ‖x − (1, 1)‖², gradient 2(x − 1). From 0: g = (−2, −2), the ascent point is
    0 + ρ·g/‖g‖ = −0.05·(1, 1)/√2; its gradient (−2 − 0.1/√2)(1, 1) is the step SGD applies at 0."""
    s = _sar(lr=0.1, momentum=0.0, rho=0.05, reset_below=0)
    grad = lambda x: 2 * (np.asarray(x) - 1)                         # noqa: E731
    c = s.ask(1)[0]
    assert c.grad and np.allclose(c.x, 0)
    s.tell([c], [Evaluation(loss=2.0, grad=grad(c.x))])
    c2 = s.ask(1)[0]
    assert c2.grad and c2.batch == c.batch and np.allclose(c2.x, -0.05 / np.sqrt(2))
    s.tell([c2], [Evaluation(loss=2.2, grad=grad(c2.x))])
    assert np.allclose(s.recommend(), 0.1 * (2 + 0.1 / np.sqrt(2)))
    assert s.info["steps"] == 1 and s.ask(1)[0].batch != c.batch   # the next step draws another batch


def test_sar_recovers_the_model_when_the_loss_collapses():
    s = _sar(lr=0.5, momentum=0.9, rho=0.0, reset_below=0.2, ema=0.5)
    # Moving average 1.0, 0.65, 0.35, then 0.18 < 0.2 on the fourth step → reset; the fifth starts afresh.
    for loss in (1.0, 0.3, 0.05, 0.01, 1.0):
        for _ in range(2):
            c = s.ask(1)[0]
            s.tell([c], [Evaluation(loss=loss, grad=np.array([1.0, -1.0]))])
    assert s.info["resets"] == 1 and s.info["steps"] == 5
    assert not np.allclose(s.recommend(), 0)       # one step taken after the reset
    assert np.allclose(s.recommend(), [-0.5, 0.5]) # from the start, with the momentum reset too


def test_sar_and_norm_tuning_run_on_tta(tmp_path, cache_dir):
    from harness.config import RunConfig
    from harness.results import load_coefficients
    from harness.runner import run
    opts = {"source": "tiny-clip", "source_options": "datasets=skdigits,lfw;max_n=400;pretrain_steps=40;ft_steps=15",
            "target": "skdigits", "objective": "entropy", "batch_size": 32}
    recs = {}
    for searcher, extra, s_opts in (("sar", {}, {"lr": 0.01, "reset_below": 0}), ("gradient", {}, {"lr": 0.01})):
        recs[searcher] = run(RunConfig(task="tta", searcher=searcher, space="norms", budget=12, seed=0,
                                       task_options={**opts, **extra}, searcher_options=s_opts,
                                       results_dir=str(tmp_path), cache_dir=cache_dir, quiet=True), log=lambda m: None)
    for rec in recs.values():
        assert rec["status"] == "complete" and rec["config"]["space"] == "norms"
        x = load_coefficients(rec["coefficients"])["x"]
        assert x.ndim == 1 and np.abs(x).max() > 0   # the norm layers moved
        assert 0 <= rec["final"]["acc"] <= 1 and "zero-shot" in rec["references"]
    assert recs["sar"]["searcher_info"]["steps"] >= 4
