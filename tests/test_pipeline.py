"""Pipelined runs (``--parallel async``): scores are told as they come in, the trace names each
row's candidate, a stopped run resumes to the same result, and the searchers that cannot take
scores out of order are refused with one line. (On Ray workers: tests/test_ray.py.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness.api import HarnessError
from harness.config import RunConfig
from harness.problem import plan
from harness.runner import run

pytestmark = pytest.mark.slow  # make test-fast leaves these out

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, parallel="async", budget=20, batch=3, searcher="nevergrad", **kw):
    return RunConfig(task="quadratic", searcher=searcher, budget=budget, batch_size=batch, seed=2,
                     task_options={"dim": 6}, parallel=parallel, results_dir=str(tmp_path), quiet=True, **kw)


def _rows(tmp_path, rec):
    path = Path(tmp_path) / "runs" / rec["run_id"] / "trace.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_an_async_run_names_each_rows_candidate_and_has_its_own_id(tmp_path):
    rec = run(_cfg(tmp_path), log=lambda m: None)
    sync = run(_cfg(tmp_path, parallel="candidates"), log=lambda m: None)
    assert rec["status"] == "complete" and rec["evaluations"] == 20
    assert rec["run_id"] != sync["run_id"]  # pipelined tells are another search: never mixed up
    rows = _rows(tmp_path, rec)
    assert [r["i"] for r in rows] == list(range(1, 21))
    assert sorted(r["cand"] for r in rows) == list(range(20))   # every candidate once, by its id
    assert "cand" not in _rows(tmp_path, sync)[0]                # batch runs' traces are unchanged
    # The searcher learnt from the scores: its best beats the start (x = 0) on this quadratic.
    assert rec["best_search_loss"] < rows[0]["loss"]


def test_a_stopped_async_run_resumes_to_the_uninterrupted_result(tmp_path):
    full = run(_cfg(tmp_path / "full"), log=lambda m: None)
    cut = _cfg(tmp_path / "cut")
    first = run(cut, log=lambda m: None)
    trace = Path(cut.results_dir) / "runs" / first["run_id"] / "trace.jsonl"
    lines = trace.read_text().splitlines()
    trace.write_text("\n".join(lines[:11]) + "\n")               # killed after 11 scores
    (trace.parent / "record.json").unlink()
    again = run(cut, log=lambda m: None)
    assert again["resumed_from"] == 11 and again["evaluations"] == 20
    assert again["final"] == full["final"] and again["best_search_loss"] == full["best_search_loss"]
    assert [json.loads(x)["cand"] for x in trace.read_text().splitlines()] == [json.loads(x)["cand"] for x in lines]


def test_a_trace_that_does_not_match_is_refused(tmp_path):
    cfg = _cfg(tmp_path)
    rec = run(cfg, log=lambda m: None)
    trace = Path(cfg.results_dir) / "runs" / rec["run_id"] / "trace.jsonl"
    rows = [json.loads(x) for x in trace.read_text().splitlines()][:5]
    rows[3]["cand"] = 99                                         # a candidate the searcher never asked for
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (trace.parent / "record.json").unlink()
    with pytest.raises(HarnessError, match="does not match the searcher's proposal at evaluation 4"):
        run(cfg, log=lambda m: None)


def test_searchers_that_need_whole_batches_are_refused_in_one_line(tmp_path):
    with pytest.raises(HarnessError, match="'gradient' does not \\(asynchronous searchers: .*nevergrad.*random"):
        plan(_cfg(tmp_path, searcher="gradient", batch=1))
    with pytest.raises(HarnessError, match="does not combine with the searcher options warm"):
        plan(_cfg(tmp_path, searcher_options={"warm": 5}))
    r = subprocess.run([sys.executable, "-m", "harness", "run", "--task", "quadratic", "--searcher", "coarse-to-fine",
                        "--parallel", "async", "--results-dir", str(tmp_path), "--quiet"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--parallel async needs a searcher" in r.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_stopped_async_ray_run_resumes(tmp_path):
    """A pipelined run on Ray workers, killed after 11 scores (its trace cut there), resumes on
    Ray: the 11 recorded rows are replayed as they were recorded, in the order the workers
    finished, and the run completes. (Replay of a finish order other than the ask order, which
    used to fail, is tested in-process, where the order can be forced: tests/test_probe_runs.py.)"""
    cfg = _cfg(tmp_path, workers=2)
    first = run(cfg, log=lambda m: None)
    assert first["status"] == "complete"
    trace = Path(cfg.results_dir) / "runs" / first["run_id"] / "trace.jsonl"
    lines = trace.read_text().splitlines()
    trace.write_text("\n".join(lines[:11]) + "\n")
    (trace.parent / "record.json").unlink()
    again = run(cfg, log=lambda m: None)
    assert again["status"] == "complete" and again["resumed_from"] == 11 and again["evaluations"] == 20
    assert trace.read_text().splitlines()[:11] == lines[:11]
