"""The example model-source plugin (examples/harness-mlp-source): pip-installed into a private
target like any third-party package, listed, and run through every composing task."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "harness-mlp-source"
DATASETS = ["digits", "inverted", "flipped", "transposed"]


def harness(*args, env, timeout=240):
    """``python -m harness ARGS`` from the project root with the plugin on PYTHONPATH."""
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The package installed with pip into its own folder (nothing under harness/ is touched)."""
    target = tmp_path_factory.mktemp("mlp-site")
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--target", str(target), str(EXAMPLE)], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    return target


@pytest.fixture(scope="module")
def env(site):
    return {**os.environ, "PYTHONPATH": str(site)}


def run(env, results: Path, task: str, searcher: str, *options: str, budget: int | None = None) -> dict:
    """One run on the mlp-digits source; returns its record after checking it completed."""
    args = ["run", "--task", task, "--searcher", searcher, "-t", "source=mlp-digits", *options,
            "--results-dir", str(results), "--quiet"]
    if budget is not None:
        args += ["--budget", str(budget)]
    r = harness(*args, env=env)
    assert r.returncode == 0, r.stderr
    records = [json.loads(p.read_text()) for p in (results / "runs").glob("*/record.json")]
    (rec,) = [x for x in records if x["task"] == task and x["searcher"] == searcher]
    assert rec["status"] == "complete" and rec["error"] == "", rec["error"]
    assert rec["plugins"]["source"] == {"name": "mlp-digits", "class": "harness_mlp_source:MLPDigitsSource",
                                        "distribution": "harness-mlp-source", "version": "0.1.0"}
    assert Path(rec["coefficients"]).exists()
    if budget is not None:
        assert rec["evaluations"] == budget
    assert all(math.isfinite(v) for v in rec["final"].values()), rec["final"]
    return rec


def test_list_shows_the_source(env):
    r = harness("list", env=env)
    assert r.returncode == 0, r.stderr
    sources = r.stdout.split("sources:")[1].split("engines:")[0]
    line = next(l for l in sources.splitlines() if l.split()[:1] == ["mlp-digits"])
    assert "example plugin" in line


def test_addition_composes_above_zero_shot(env, tmp_path):
    ta = run(env, tmp_path, "addition", "task-arithmetic")
    assert ta["task_vectors"] == DATASETS
    refs = ta["references"]
    zero, ft = refs["zero-shot"], refs["fine-tuned (each its own)"]
    (ta_key,) = [k for k in refs if k.startswith("task arithmetic")]
    # The run picks α exactly as the reference does (same grid, same search set).
    assert ta["final"] == refs[ta_key]
    # The source leaves headroom: each fine-tuned tail beats the pre-trained one on its data set.
    assert ft["normalized_acc"] == 1.0
    for ds in DATASETS:
        assert 0.5 < zero[f"acc/{ds}"] < ft[f"acc/{ds}"] <= 1.0
    assert ft["abs_acc"] >= zero["abs_acc"] + 0.05
    assert math.isfinite(zero["normalized_acc"]) and zero["normalized_acc"] < 1.0
    assert ta["final"]["normalized_acc"] >= zero["normalized_acc"]

    # aTLAS, black-box, one coefficient per (task vector, layer): fc1 and fc2. With 30 evaluations
    # NGOpt's Cobyla is still laying out its first simplex in the 16-d per_block space (measured
    # below zero-shot on seed 0), while the 8-d per_layer space is past it.
    atlas = run(env, tmp_path, "addition", "nevergrad", "--space", "per_layer", budget=30)
    assert atlas["references"]["zero-shot"] == zero  # the source is rebuilt bit-identically
    assert atlas["final"]["normalized_acc"] >= zero["normalized_acc"]
    assert set(atlas["family"]) == {"pretrained", "task_vectors", "data"} and atlas["family"] == ta["family"]


@pytest.mark.parametrize("task, options, composed, headline", [
    ("negation", ["-t", "target=inverted", "-t", "control=digits"], ["inverted"], "target_acc"),
    # augment and ufm re-encode 8x8 views of the raw images through the source's prefix.
    ("few_shot", ["-t", "target=flipped", "-t", "augment=1", "-t", "flip=false"],
     ["digits", "inverted", "transposed"], "acc"),
    ("tta", ["-t", "target=transposed", "-t", "objective=ufm", "-t", "flip=false"],
     ["digits", "inverted", "flipped"], "acc"),
])
def test_other_tasks_complete(env, tmp_path, task, options, composed, headline):
    rec = run(env, tmp_path, task, "nevergrad", *options, budget=20)
    assert rec["task_vectors"] == composed
    assert 0.0 <= rec["final"][headline] <= 1.0
    assert "zero-shot" in rec["references"]


def test_build_is_deterministic_and_splits_disjoint(site, monkeypatch):
    """In process: the installed class through the registry, its data and its reproducibility."""
    monkeypatch.syspath_prepend(str(site))
    from harness import registry
    from harness.api import HarnessError, Source
    cls = registry.load("source", "mlp-digits")
    assert issubclass(cls, Source) and not cls.cached
    module = sys.modules[cls.__module__]

    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    a = cls.load(cls.Options(), progress=False)
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)
    b = cls.load(cls.Options(), progress=False)
    assert a.datasets == DATASETS and a.kind == "linear" and not a.normalize and a.device.type == "cpu"
    assert set(a.base) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    for ds in DATASETS:
        assert all(torch.equal(a.task_vectors[ds][k], b.task_vectors[ds][k]) for k in a.base)
        assert a.classes[ds] == [str(i) for i in range(10)]
        assert {s: len(y) for s, y in a.labels[ds].items()} == {"train": 175, "val": 70, "test": 105}
        assert a.images[ds]["test"].dtype == np.uint8 and a.inputs[ds]["test"].shape == (105, 64)
        assert a.meta["finetuned_acc"][ds] > a.meta["zero_shot_acc"][ds]

    # Every view is its own inverse; undone, no base image may be used more often than the raw set
    # holds it: the pre-training pool and all splits of all data sets are disjoint.
    pool, splits = module.make_data(cls.Options())
    used = [im.tobytes() for im in pool[0][:len(pool[0]) // len(DATASETS)]]  # the pool's "digits" view
    for ds, parts in splits.items():
        for images, _ in parts.values():
            used += [im.tobytes() for im in module.VIEWS[ds](images)]
    raw = Counter(im.tobytes() for im in module.digit_images()[0])
    assert len(used) == 360 + 4 * 350
    assert all(raw[k] >= n for k, n in Counter(used).items())

    with pytest.raises(HarnessError, match="unknown data set 'rotated'"):
        cls.validate(cls.Options(datasets=["rotated"]))
    with pytest.raises(HarnessError, match="at most 1797"):
        cls.validate(cls.Options(n_per_set=400))
