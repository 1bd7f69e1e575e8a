"""Named presets: each one plans into a valid run, flags override them, the README shows them."""
from __future__ import annotations

from pathlib import Path

import pytest

from harness.api import HarnessError
from harness.config import build_config
from harness.presets import PRESETS
from harness.problem import plan


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_plans(name):
    p = plan(build_config({"preset": name}))
    preset = PRESETS[name]
    assert (p.config.task, p.config.searcher) == (preset.task, preset.searcher)
    for k, v in preset.task_options.items():
        got = p.config.task_options[k]
        assert got == v or (k == "transform" and got.split(":")[0] == v.split(":")[0]), (k, got, v)
    for k, v in preset.searcher_options.items():
        assert p.config.searcher_options[k] == v


def test_flags_override_the_preset():
    cfg = build_config({"preset": "adamerging-layer", "budget": 7, "searcher_options": {"lr": 0.01},
                        "task_options": {"objective": "ce"}})
    assert (cfg.task, cfg.searcher, cfg.space, cfg.budget) == ("addition", "gradient", "per_layer", 7)
    assert cfg.searcher_options == {"warm": 11, "lr": 0.01}
    assert cfg.task_options == {"objective": "ce"}
    with pytest.raises(HarnessError, match="unknown preset 'adamerging'; valid: zero-shot, "):
        build_config({"preset": "adamerging"})


def test_fusionbench_variants_resolve_to_a_fixed_scale():
    p = plan(build_config({"preset": "ties-fusionbench"}))
    assert p.config.task_options["transform"] == "ties:exclude=^proj$,merge=sum"
    assert (p.searcher_options.lo, p.searcher_options.hi, p.searcher_options.points) == (0.3, 0.3, 1)
    p = plan(build_config({"preset": "iso-c-fusionbench"}))
    assert p.config.task_options["transform"] == "iso:conv=other,other=mean"


def test_the_docs_list_every_preset_with_its_flags():
    page = (Path(__file__).resolve().parents[1] / "docs" / "reference" / "presets.md").read_text()
    for name, p in PRESETS.items():
        assert f"## `{name}`" in page and f"# = {p.flags()}" in page


SMALL_ZOO = "datasets=skdigits,lfw;max_n=400;pretrain_steps=40;ft_steps=15"


def test_adamerging_objective_is_entropy_on_unlabelled_test_inputs(cache_dir):
    """addition -t objective=entropy: the search loss is the mean over data sets of the mean
    prediction entropy on test inputs, computed here by hand from the source; no label is read."""
    import numpy as np
    from harness import registry
    from harness.api import Candidate
    from harness.config import resolve_options
    from harness.evaluators import reduce_shards
    from atlas_harness_tasks.addition import AdditionTask
    opts = resolve_options(AdditionTask, {"source": "tiny-clip", "source_options": SMALL_ZOO, "search_n": 16,
                                          "objective": "entropy"}, "task")
    AdditionTask.validate(opts)
    task = AdditionTask(opts, space="per_layer", seed=0, cache_dir=cache_dir)
    task.setup("cpu")
    assert AdditionTask.data_for(opts) == "unlabelled test"
    assert all(bool((y == -1).all()) for y in task.search.labels)
    x = np.full(task.comp.dim, 0.4)
    params = task.comp.merge(x)
    want = []
    for ds in task.names:
        idx = task.subset(ds, "test", 16, salt=task.names.index(ds))
        logp = task.source.logits(params, task.source.inputs[ds]["test"][idx], ds).log_softmax(1)
        want.append(float(-(logp.exp() * logp).sum(1).mean()))
    ev = task.evaluate([Candidate(x=x)])[0]
    assert ev.loss == pytest.approx(np.mean(want), rel=1e-5)
    # Shards reduce to the whole-set loss, and the gradient path works on mini-batches.
    parts = [task.evaluate([Candidate(x=x)], shard=(i, 3))[0] for i in range(3)]
    assert reduce_shards(parts).loss == pytest.approx(ev.loss, rel=1e-5)
    g = task.evaluate([Candidate(x=x, grad=True, batch=5)])[0]
    assert g.grad is not None and np.isfinite(g.grad).all() and np.abs(g.grad).sum() > 0
    with pytest.raises(HarnessError, match="task option objective='mse' is not one of ce, entropy"):
        registry.validate("task", AdditionTask, resolve_options(AdditionTask, {"objective": "mse"}, "task"))
