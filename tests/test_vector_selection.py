"""Whole task-vector selection (``-t select_vectors=b -t select_by=...``, the paper's Table 14)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

import harness
from harness.api import Candidate
from harness.config import RunConfig
from harness.problem import build_task, plan

ROOT = Path(__file__).resolve().parents[1]
BASE = {"source": "tiny-clip", "target": "cvdigits", "shots": 2}


def test_gradient_selection_keeps_the_vectors_with_the_largest_whole_vector_derivative(cache_dir, tmp_path):
    full, _ = build_task(plan(RunConfig(task="few_shot", searcher="gradient", space="per_block", task_options=dict(BASE),
                                        results_dir=str(tmp_path), cache_dir=cache_dir)))
    g = full.evaluate([Candidate(x=full.space().start, grad=True)])[0].grad.reshape(full.comp.T, -1).sum(1)
    want = sorted(np.asarray(full.comp.task_names)[np.argsort(-np.abs(g))[:2]].tolist(),
                  key=full.comp.task_names.index)
    task, report = build_task(plan(RunConfig(task="few_shot", searcher="gradient", space="per_block",
                                             task_options={**BASE, "select_vectors": 2}, results_dir=str(tmp_path),
                                             cache_dir=cache_dir)))
    rep = report["vector_selection"]
    assert rep["kept"] == want == task.comp.task_names
    assert task.space().dim == 2 * full.comp.B and len(task.zero) == task.space().dim
    assert rep["scores"] == {n: round(abs(float(v)), 6) for n, v in zip(full.comp.task_names, g)}


def test_feature_and_random_selection_in_runs(cache_dir, tmp_path):
    kw = dict(task="few_shot", searcher="gradient", budget=4, space="per_task", results_dir=str(tmp_path), cache_dir=cache_dir)
    feats = harness.run(task_options={**BASE, "select_vectors": 3, "select_by": "features"}, **kw)
    rep = feats.record["vector_selection"]
    assert len(rep["kept"]) == 3 and len(feats.coefficients["x"]) == 3
    top = sorted(rep["scores"], key=lambda n: -rep["scores"][n])[:3]
    assert sorted(top) == sorted(rep["kept"]) and all(-1 <= v <= 1 for v in rep["scores"].values())
    rnd = [harness.run(seed=s, task_options={**BASE, "select_vectors": 2, "select_by": "random"}, **kw) for s in (0, 1, 2)]
    kept = {tuple(r.record["vector_selection"]["kept"]) for r in rnd}
    assert all(len(k) == 2 for k in kept) and len(kept) > 1     # seeded: the seeds draw different pairs


def test_select_vectors_is_for_tasks_that_choose_among_others(tmp_path):
    r = subprocess.run([sys.executable, "-m", "harness", "run", "--task", "addition", "--searcher", "task-arithmetic",
                        "-t", "source=tiny-clip", "-t", "select_vectors=2", "--results-dir", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "error: task option select_vectors chooses among the other data sets' task vectors (few_shot, tta); "
        "addition composes a fixed set")
