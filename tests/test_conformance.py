"""One suite over every registered searcher, task, model source and engine (the checks of
``harness/conformance.py``, which ``python -m harness check-plugin`` runs too).

A new plugin is tested the moment it is installed. Options a plugin needs to be tested quickly go
in the dicts and fixtures below; a plugin absent from them runs with its defaults.
"""
from __future__ import annotations

import pytest

from harness import registry
from harness.config import RunConfig, resolve_options
from harness.conformance import check_engine, check_searcher, check_source, check_task, check_transform
from harness.runner import run

# Searcher options for the 6-D quadratic (paper defaults are tuned for real models).
SEARCHER_OPTIONS: dict[str, dict] = {"gradient": {"lr": 0.05, "validate_every": 25},
                                     "sar": {"lr": 0.05, "reset_below": 0}}  # its recovery would reset near the optimum
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


@pytest.mark.parametrize("name", SEARCHERS)
def test_searcher_keeps_every_promise(tmp_path, name):
    """The shipped suite (``python -m harness check-plugin NAME`` runs the same)."""
    checks = check_searcher(name, SEARCHER_OPTIONS.get(name, {}), str(tmp_path))
    assert len(checks) == 4
    assert all(c.ok for c in checks), [f"{c.name}: {c.detail}" for c in checks if not c.ok]


@pytest.mark.parametrize("name", registry.names("transform"))
def test_transform_keeps_every_promise(name):
    checks = check_transform(name)
    assert len(checks) == 6
    assert all(c.ok for c in checks), [f"{c.name}: {c.detail}" for c in checks if not c.ok]


# Every device this machine can compute on (tests of the plumbing without a GPU: tests/test_device.py).
DEVICES = ["cpu"] + [f"cuda:{i}" for i in range(__import__("torch").cuda.device_count())]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", TASKS)
def test_task_keeps_every_promise(name, device, cache_dir):
    checks = check_task(name, TASK_OPTIONS.get(name, {}), cache_dir, device=device)
    assert len(checks) == 6
    assert all(c.ok for c in checks), [f"{c.name}: {c.detail}" for c in checks if not c.ok]


# ----------------------------------------------------------------------------- sources and engines

SOURCES = registry.names("source")
ENGINES = registry.names("engine")
# Options that keep each built-in source small; a source absent from here runs with its defaults.
SOURCE_OPTIONS = {
    "tiny-clip": SMALL_ZOO,
    "effnet": "datasets=skdigits,lfw;max_n=300;head_steps=30;ft_steps=4;ft_batch_size=32;threads=1",
}


@pytest.fixture(scope="module")
def open_clip_files(tmp_path_factory, tiny_open_clip):
    """Two fine-tuned checkpoints (seeded noise) of the tiny open_clip model for the built-in data
    sets skdigits and lfw: what the open_clip source loads."""
    import torch
    from harness.checkpoints import save_state_dict
    model, folder = tiny_open_clip
    tmp = tmp_path_factory.mktemp("open_clip")
    gen = torch.Generator().manual_seed(1)
    for ds in ("skdigits", "lfw"):
        tuned = {f"visual.{k}": v + 0.02 * torch.randn(v.shape, generator=gen)
                 for k, v in model.visual.state_dict().items() if v.is_floating_point()}
        save_state_dict(tuned, tmp / f"{ds}.safetensors")
    return {"pretrained": f"local-dir:{folder}", "checkpoints": [str(tmp / "skdigits.safetensors"),
                                                                        str(tmp / "lfw.safetensors")],
            "source_options": "max_n=200"}


@pytest.fixture(scope="module")
def hf_clip_files(tmp_path_factory):
    """A tiny Hugging Face CLIPModel folder and two CLIPVisionModel fine-tunes (seeded noise) for
    the built-in data sets skdigits and lfw: what the hf_clip source loads."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel
    tmp = tmp_path_factory.mktemp("hf_clip")
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                                      max_position_embeddings=16, vocab_size=49408),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                        num_hidden_layers=1, image_size=32, patch_size=8), projection_dim=24)
    model = CLIPModel(cfg)
    model.save_pretrained(tmp / "pretrained")
    for ds in ("skdigits", "lfw"):
        vis = CLIPVisionModel(cfg.vision_config)
        getattr(vis, "vision_model", vis).load_state_dict(model.vision_model.state_dict())
        with torch.no_grad():
            for p in vis.parameters():
                p.add_(0.02 * torch.randn_like(p))
        vis.save_pretrained(tmp / ds)
    return {"pretrained": str(tmp / "pretrained"), "checkpoints": [f"{ds}={tmp / ds}" for ds in ("skdigits", "lfw")],
            "source_options": "max_n=200"}


def _source_task_options(name, request) -> dict:
    if name == "open_clip":
        return {"source": name, **request.getfixturevalue("open_clip_files")}
    if name == "hf_clip":
        return {"source": name, **request.getfixturevalue("hf_clip_files")}
    return {"source": name, "source_options": SOURCE_OPTIONS.get(name, "")}


@pytest.mark.parametrize("name", SOURCES)
def test_source_builds_what_objectives_and_engines_need(name, cache_dir, request):
    from harness.objective import resolve_source
    from atlas_harness_tasks.addition import AdditionTask
    given = _source_task_options(name, request)
    checks = check_source(name, given.pop("source_options", ""), {k: v for k, v in given.items() if k != "source"},
                          cache_dir)
    assert len(checks) == 10
    assert all(c.ok for c in checks), [f"{c.name}: {c.detail}" for c in checks if not c.ok]
    # It moves to a device whole.
    opts = resolve_options(AdditionTask, _source_task_options(name, request), "task")
    AdditionTask.validate(opts)
    cls, sopts = resolve_source(opts)
    src = cls.load(sopts, cache_dir=cache_dir, progress=False)
    src.to("meta")
    moved = list(src.base.values()) + [t for wb in src.heads.values() for t in wb]
    moved += [t for sp in src.inputs.values() for t in sp.values()] + list(src.tail.parameters())
    assert all(t.device.type == "meta" for t in moved)


@pytest.mark.parametrize("name", ENGINES)
def test_engine_scores_equal_the_sequential_reference(name, cache_dir):
    """Every engine gives the losses, accuracies and gradients of one plain merge + forward per
    candidate (LocalEngine.weighted_ce), for batches of several candidates and for shards."""
    checks = check_engine(name, TASK_OPTIONS["addition"], cache_dir)
    assert all(c.ok for c in checks), [f"{c.name}: {c.detail}" for c in checks if not c.ok]


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
    from harness.leaderboards import leaderboard
    board = leaderboard(tmp_path)
    assert board["family"].iloc[0] == f"{fam['pretrained'][:8]}/{fam['task_vectors'][:8]}"
    assert leaderboard(tmp_path, family_prefix="zzzz").empty
