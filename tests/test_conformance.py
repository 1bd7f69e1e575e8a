"""One suite over every registered searcher and every registered task.

A new plugin is tested the moment it is installed. Options a plugin needs to be tested quickly go
in the two dicts below; a plugin absent from them runs with its defaults.
"""
from __future__ import annotations

import numpy as np
import pytest

from harness import registry
from harness.api import Candidate, Searcher
from harness.config import RunConfig, resolve_options
from harness.evaluators import reduce_shards
from harness.runner import run

# Searcher options for the 6-D quadratic (paper defaults are tuned for real models).
SEARCHER_OPTIONS: dict[str, dict] = {"gradient": {"lr": 0.05, "validate_every": 25}}
# One small tiny-clip zoo for every zoo task in the suite (built once per test session).
SMALL_ZOO = "datasets=skdigits,lfw;max_n=400;pretrain_steps=40;ft_steps=15"
# Task options that keep each task small in tests (tiny zoo, few samples).
TASK_OPTIONS: dict[str, dict] = {
    "addition": {"source": "tiny-clip", "source_options": SMALL_ZOO, "search_n": 32},
    "negation": {"source": "tiny-clip", "source_options": SMALL_ZOO, "target": "skdigits", "control": "lfw", "search_n": 32},
    "few_shot": {"source": "tiny-clip", "source_options": SMALL_ZOO, "target": "skdigits", "shots": 2},
    # threshold 0 and trusted_fraction 1: on 64 images of the tiny zoo every UFM term is non-zero
    "tta": {"source": "tiny-clip", "source_options": SMALL_ZOO, "target": "skdigits", "max_n": 64, "threshold": 0.0,
            "trusted_fraction": 1.0},
}

SEARCHERS = registry.names("searcher")
TASKS = registry.names("task")


def _run(tmp_path, searcher, seed=0, budget=300, batch=None):
    cfg = RunConfig(task="quadratic", searcher=searcher, budget=budget, batch_size=batch, seed=seed,
                    task_options={"dim": 6}, searcher_options=SEARCHER_OPTIONS.get(searcher, {}),
                    results_dir=str(tmp_path), quiet=True)
    return run(cfg, log=lambda m: None)


@pytest.mark.parametrize("name", SEARCHERS)
def test_searcher_gets_close_to_the_optimum(tmp_path, name):
    cls = registry.load("searcher", name)
    rec = _run(tmp_path, name)
    start = rec["references"]["start (x = 0)"]["loss"]
    if cls.reference:
        assert rec["final"]["loss"] <= start + 1e-12
    else:
        assert rec["final"]["distance"] < 0.15, rec["final"]
        assert rec["final"]["loss"] < 0.05 * start


@pytest.mark.parametrize("name", SEARCHERS)
def test_searcher_respects_budget_and_batch(tmp_path, name):
    cls = registry.load("searcher", name)
    batch = min(4, cls.max_batch or 4)
    budget = 23
    rec = _run(tmp_path, name, budget=budget, batch=batch)
    rows = [r for r in _trace(tmp_path, rec)]
    assert rec["evaluations"] == len(rows) <= budget
    if not cls.reference:
        assert len(rows) == budget
    # The runner never hands the searcher more than the batch size at once: rows come in rounds.
    assert rec["config"]["batch_size"] == batch


def _trace(tmp_path, rec):
    from harness.results import read_jsonl
    from pathlib import Path
    return read_jsonl(Path(tmp_path) / "runs" / rec["run_id"] / "trace.jsonl")


@pytest.mark.parametrize("name", SEARCHERS)
def test_searcher_same_seed_same_result(tmp_path, name):
    a = _run(tmp_path / "a", name, seed=3, budget=60)
    b = _run(tmp_path / "b", name, seed=3, budget=60)
    assert a["final"] == b["final"]
    xa = [r["x"] for r in _trace(tmp_path / "a", a)]
    xb = [r["x"] for r in _trace(tmp_path / "b", b)]
    assert xa == xb


@pytest.mark.parametrize("name", SEARCHERS)
def test_searcher_ask_returns_candidates_in_the_box(name):
    from tasks.quadratic import QuadraticTask
    cls = registry.load("searcher", name)
    task = QuadraticTask(QuadraticTask.Options(dim=5), seed=0)
    task.setup()
    space = task.space()
    s: Searcher = cls(space, 10, 2, 0, resolve_options(cls, SEARCHER_OPTIONS.get(name, {}), "searcher"))
    try:
        cands = s.ask(2)
        assert 1 <= len(cands) <= 2
        for c in cands:
            assert c.x.shape == (5,)
            assert np.all(c.x >= space.lower - 1e-9) and np.all(c.x <= space.upper + 1e-9)
            assert c.grad == cls.needs_gradient or not c.grad
        s.tell(cands, task.evaluate(cands))
        assert s.recommend().shape == (5,)
    finally:
        s.close()


def _task(name, cache_dir, seed=0, device="cpu"):
    cls = registry.load("task", name)
    opts = resolve_options(cls, TASK_OPTIONS.get(name, {}), "task")
    task = cls(opts, space="per_block" if name != "quadratic" else "flat", seed=seed, cache_dir=cache_dir)
    task.setup(device)
    return task


# Every device this machine can compute on (tests of the plumbing without a GPU: tests/test_device.py).
DEVICES = ["cpu"] + [f"cuda:{i}" for i in range(__import__("torch").cuda.device_count())]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", TASKS)
def test_task_space_and_evaluations(name, device, cache_dir):
    task = _task(name, cache_dir, device=device)
    space = task.space()
    assert space.dim >= 1
    assert np.all(space.lower < space.upper)
    assert np.all(space.start >= space.lower) and np.all(space.start <= space.upper)
    assert space.labels is None or len(space.labels) == space.dim
    rng = np.random.default_rng(0)
    xs = [space.start, rng.uniform(space.lower, space.upper) * 0.3]
    cands = [Candidate(x=x) for x in xs]
    evs = [task.complete(c, e) for c, e in zip(cands, task.evaluate(cands))]
    assert len(evs) == 2 and all(np.isfinite(e.loss) and e.ok for e in evs)
    # Same candidate, same loss: the search objective is deterministic.
    assert task.complete(cands[1], task.evaluate([cands[1]])[0]).loss == pytest.approx(evs[1].loss, rel=1e-6)
    # Shards are disjoint parts whose weighted mean is the whole (for tasks that declare it).
    parts = [task.evaluate([cands[1]], shard=(i, 2))[0] for i in range(2)]
    assert all(np.isfinite(p.loss) for p in parts)
    if type(task).shardable(task.options):
        assert task.complete(cands[1], reduce_shards(parts)).loss == pytest.approx(evs[1].loss, rel=1e-5, abs=1e-6)
    g = task.evaluate([Candidate(x=xs[1], grad=True, batch=0)])[0]
    assert g.grad is not None and g.grad.shape == (space.dim,) and np.all(np.isfinite(g.grad))
    final = task.final(space.start)
    assert task.headline in final and np.isfinite(final[task.headline])


# ----------------------------------------------------------------------------- sources and engines

SOURCES = registry.names("source")
ENGINES = registry.names("engine")
# Options that keep each built-in source small; a source absent from here runs with its defaults.
SOURCE_OPTIONS = {
    "tiny-clip": SMALL_ZOO,
    "effnet": "datasets=skdigits,lfw;max_n=300;head_steps=30;ft_steps=4;ft_batch_size=32;threads=1",
}


@pytest.fixture(scope="module")
def open_clip_files(tmp_path_factory):
    """A tiny open_clip ``local-dir:`` model and two fine-tuned checkpoints (seeded noise) for the
    built-in data sets skdigits and lfw: what the open_clip source loads."""
    import json
    import open_clip
    import torch
    from harness.checkpoints import save_state_dict
    arch = {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    tmp = tmp_path_factory.mktemp("open_clip")
    (tmp / "model").mkdir()
    (tmp / "model" / "open_clip_config.json").write_text(json.dumps({"model_cfg": arch, "preprocess_cfg": {}}))
    torch.manual_seed(0)
    model = open_clip.CLIP(**arch)
    save_state_dict(dict(model.state_dict()), tmp / "model" / "open_clip_model.safetensors")
    gen = torch.Generator().manual_seed(1)
    for ds in ("skdigits", "lfw"):
        tuned = {f"visual.{k}": v + 0.02 * torch.randn(v.shape, generator=gen)
                 for k, v in model.visual.state_dict().items() if v.is_floating_point()}
        save_state_dict(tuned, tmp / f"{ds}.safetensors")
    return {"pretrained": f"local-dir:{tmp / 'model'}", "checkpoints": [str(tmp / "skdigits.safetensors"),
                                                                        str(tmp / "lfw.safetensors")],
            "source_options": "max_n=200"}


def _source_task_options(name, request) -> dict:
    if name == "open_clip":
        return {"source": name, **request.getfixturevalue("open_clip_files")}
    return {"source": name, "source_options": SOURCE_OPTIONS.get(name, "")}


@pytest.mark.parametrize("name", SOURCES)
def test_source_builds_what_objectives_and_engines_need(name, cache_dir, request):
    import torch
    from harness.objective import resolve_source
    from tasks.addition import AdditionTask
    opts = resolve_options(AdditionTask, _source_task_options(name, request), "task")
    AdditionTask.validate(opts)
    cls, sopts = resolve_source(opts)
    src = cls.load(sopts, cache_dir=cache_dir, progress=False)
    assert len(src.datasets) >= 2 and src.base
    for ds in src.datasets:
        tv = src.task_vectors[ds]
        assert list(tv) == list(src.base) and all(tv[k].shape == src.base[k].shape for k in tv)
        assert all(torch.isfinite(v).all() for v in tv.values()) and any(v.abs().sum() > 0 for v in tv.values())
        w, b = src.heads[ds]
        assert w.shape[0] == b.shape[0] == len(src.classes[ds])
        for split in ("train", "val", "test"):
            assert len(src.inputs[ds][split]) == len(src.labels[ds][split]) > 0
        assert 0 <= src.meta["finetuned_acc"][ds] <= 1
    # Objectives run on it: task addition scores the start and a composition with finite losses.
    task = AdditionTask(opts, space="per_layer", seed=0, cache_dir=cache_dir)
    task.setup("cpu")
    evs = task.evaluate([Candidate(x=task.space().start), Candidate(x=np.full(task.space().dim, 0.3))])
    assert all(e.ok and np.isfinite(e.loss) for e in evs)
    assert np.isfinite(task.final(task.space().start)["normalized_acc"])
    # It moves to a device whole.
    src.to("meta")
    moved = list(src.base.values()) + [t for wb in src.heads.values() for t in wb]
    moved += [t for sp in src.inputs.values() for t in sp.values()] + list(src.tail.parameters())
    assert all(t.device.type == "meta" for t in moved)


@pytest.mark.parametrize("name", ENGINES)
def test_engine_scores_equal_the_sequential_reference(name, cache_dir):
    """Every engine gives the losses, accuracies and gradients of one plain merge + forward per
    candidate (LocalEngine.weighted_ce), for batches of several candidates and for shards."""
    from tasks.addition import AdditionTask
    opts = resolve_options(AdditionTask, {**TASK_OPTIONS["addition"], "engine": name}, "task")
    task = AdditionTask(opts, space="per_block", seed=0, cache_dir=cache_dir)
    task.setup("cpu")
    ref = AdditionTask(resolve_options(AdditionTask, {**TASK_OPTIONS["addition"], "population": "off"}, "task"),
                       space="per_block", seed=0, cache_dir=cache_dir)
    ref.setup("cpu")
    rng = np.random.default_rng(0)
    cands = [Candidate(x=rng.uniform(-0.4, 0.4, task.space().dim)) for _ in range(5)]
    for shard in (None, (0, 2)):
        got = task.engine.score(cands, task.search, shard)
        want = [ref.engine.weighted_ce(c, ref.search, shard) for c in cands]
        for a, b in zip(got, want):
            assert a.loss == pytest.approx(b.loss, rel=1e-5) and a.metrics["acc"] == pytest.approx(b.metrics["acc"])
            assert a.weight == pytest.approx(b.weight)
    g = task.engine.score([Candidate(x=cands[0].x, grad=True)], task.search)[0]
    g_ref = ref.engine.weighted_ce(Candidate(x=cands[0].x, grad=True), ref.search)
    assert np.allclose(g.grad, g_ref.grad, rtol=1e-4, atol=1e-7)


def test_records_name_every_plugin_and_the_checkpoint_family(tmp_path, cache_dir):
    cfg = RunConfig(task="addition", searcher="task-arithmetic", budget=3, seed=0,
                    task_options=dict(TASK_OPTIONS["addition"]), results_dir=str(tmp_path), cache_dir=cache_dir, quiet=True)
    rec = run(cfg, log=lambda m: None)
    plugins = rec["plugins"]
    assert set(plugins) == {"searcher", "task", "source", "engine"}
    assert plugins["source"]["name"] == "tiny-clip" and plugins["engine"]["name"] == "local"
    assert all(p["distribution"] == "atlas-harness" and p["version"] for p in plugins.values())
    fam = rec["family"]
    assert len(fam["pretrained"]) == 16 and fam["pretrained"] != fam["task_vectors"]
    again = run(RunConfig(**{**cfg.__dict__, "seed": 1}), log=lambda m: None)
    assert again["family"] == fam  # same checkpoints, same family, whatever the seed
    from harness.leaderboard import leaderboard
    board = leaderboard(tmp_path)
    assert board["family"].iloc[0] == f"{fam['pretrained'][:8]}/{fam['task_vectors'][:8]}"
    assert leaderboard(tmp_path, family_prefix="zzzz").empty
