"""Run records and traces: resume after SIGKILL, failed evaluations, corrupt lines."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.config import RunConfig
from harness.leaderboards import leaderboard
from harness.results import read_jsonl
from harness.runner import run
from tests.permissions import honour_permissions

ROOT = Path(__file__).resolve().parents[1]


def _cmd(res, searcher, extra=()):
    return [sys.executable, "-m", "harness", "run", "--task", "quadratic", "--searcher", searcher, "--budget", "80",
            "--seed", "5", "-t", "dim=6", "-t", "delay=0.02", "--results-dir", str(res), "--quiet", *extra]


@pytest.mark.parametrize("searcher, extra", [("nevergrad", ()), ("random", ()), ("dfo-gn", ()),
                                             ("gradient", ("-s", "lr=0.05", "-s", "validate_every=10"))])
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, searcher, extra):
    from harness import registry
    if searcher not in registry.names("searcher"):
        pytest.fail(f"searcher {searcher} is not registered")
    ref = subprocess.run(_cmd(tmp_path / "ref", searcher, extra), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    proc = subprocess.Popen(_cmd(tmp_path / "cut", searcher, extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = tmp_path / "cut" / "runs"
    deadline = time.time() + 120
    while time.time() < deadline:
        traces = list(runs.glob("*/trace.jsonl")) if runs.exists() else []
        if traces and len(traces[0].read_text().splitlines()) >= 30:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    trace = next(runs.glob("*/trace.jsonl"))
    done = len(read_jsonl(trace))
    assert 30 <= done < 80
    with open(trace, "a") as f:  # a torn last line, as a kill during a write leaves it
        f.write('{"i": 99, "x": [0.1, ')
    again = subprocess.run(_cmd(tmp_path / "cut", searcher, extra), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resuming run" in again.stderr and f"from {done} recorded evaluations" in again.stderr
    rec_ref = json.loads(next((tmp_path / "ref" / "runs").glob("*/record.json")).read_text())
    rec_cut = json.loads(next(runs.glob("*/record.json")).read_text())
    assert rec_cut["status"] == "complete" and rec_cut["evaluations"] == 80
    assert rec_cut["final"] == rec_ref["final"]
    rows_ref = read_jsonl(next((tmp_path / "ref" / "runs").glob("*/trace.jsonl")))
    rows_cut = read_jsonl(trace, warn=False)
    assert [r["x"] for r in rows_cut] == [r["x"] for r in rows_ref]  # nothing lost, nothing twice
    assert [r["i"] for r in rows_cut] == list(range(1, 81))


def test_completed_run_is_not_repeated(tmp_path):
    cfg = RunConfig(task="quadratic", searcher="random", budget=20, results_dir=str(tmp_path), quiet=True)
    a = run(cfg, log=lambda m: None)
    msgs = []
    b = run(cfg, log=msgs.append)
    assert b == a and "already complete" in msgs[0]


def test_nan_losses_are_failed_evaluations_and_search_goes_on(tmp_path):
    cfg = RunConfig(task="quadratic", searcher="random", budget=120, results_dir=str(tmp_path), quiet=True,
                    task_options={"dim": 3, "nan_above": 0.0}, searcher_options={"mode": "uniform"})
    rec = run(cfg, log=lambda m: None)
    rows = read_jsonl(tmp_path / "runs" / rec["run_id"] / "trace.jsonl")
    bad = [r for r in rows if not r["ok"]]
    assert rec["status"] == "complete" and rec["failed_evaluations"] == len(bad) > 10
    assert all(r["x"][0] > 0 and "non-finite" in r["error"] for r in bad)
    assert rec["final"]["distance"] == rec["final"]["distance"]  # finite: the recommendation is a good point


def test_corrupt_lines_and_records_are_reported_and_skipped(tmp_path, capsys):
    for seed in (0, 1):
        run(RunConfig(task="quadratic", searcher="random", budget=10, seed=seed, results_dir=str(tmp_path), quiet=True),
            log=lambda m: None)
    recs = sorted((tmp_path / "runs").glob("*/record.json"))
    recs[1].write_text('{"run_id": "broken", "status": "compl')
    trace = recs[0].parent / "trace.jsonl"
    lines = trace.read_text().splitlines()
    trace.write_text("\n".join(lines[:3] + ["not json", "[1, 2]"] + lines[3:]) + "\n")
    rows = read_jsonl(trace)
    err = capsys.readouterr().err
    assert len(rows) == 10 and "skipped corrupt line 4" in err and "skipped corrupt line 5" in err
    board = leaderboard(tmp_path)
    assert board["n"].tolist() == [1]
    assert "unreadable run record" in capsys.readouterr().err


def test_a_torn_trace_and_a_trace_without_its_record_are_reported(tmp_path, capsys):
    """A complete run whose trace was cut mid-line still ranks (its record is whole), but its
    curve is said to be partial; a folder with a trace and no record is named, not skipped silently."""
    import shutil

    from harness.plots import curves
    for seed in (0, 1):
        run(RunConfig(task="quadratic", searcher="random", budget=10, seed=seed, results_dir=str(tmp_path), quiet=True),
            log=lambda m: None)
    first, second = sorted((tmp_path / "runs").iterdir())
    trace = first / "trace.jsonl"
    trace.write_bytes(trace.read_bytes()[: len(trace.read_bytes()) // 2])  # cut mid-line
    shutil.copytree(second, tmp_path / "runs" / "orphan")
    (tmp_path / "runs" / "orphan" / "record.json").unlink()
    capsys.readouterr()
    assert leaderboard(tmp_path)["n"].tolist() == [2]
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "skipped run folder" in err and "orphan" in err and "no record.json" in err
    curves(tmp_path)
    err = capsys.readouterr().err
    assert f"the trace of run {first.name} holds" in err and "of its 10 evaluations" in err and "partial" in err


def test_a_copied_run_folder_counts_once(tmp_path, capsys):
    """A run folder copied under another name holds the same record: the leaderboard ranks the
    run once (n = 1, not 2 seeds' worth) and names the copy in one warning line."""
    import shutil
    run(RunConfig(task="quadratic", searcher="random", budget=10, seed=0, results_dir=str(tmp_path), quiet=True),
        log=lambda m: None)
    (original,) = (tmp_path / "runs").iterdir()
    shutil.copytree(original, tmp_path / "runs" / "a-backup")  # sorts before the original
    capsys.readouterr()
    board = leaderboard(tmp_path)
    assert board["n"].tolist() == [1]
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "a-backup" in err and f"already read from {original}" in err


def test_results_dir_that_is_a_file_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = subprocess.run([sys.executable, "-m", "harness", "run", "--task", "quadratic", "--searcher", "random",
                        "--results-dir", str(blocker), "--quiet"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "cannot write results to" in r.stderr


def test_read_only_results_dir_is_one_clear_error_and_keeps_earlier_runs(tmp_path):
    base = tmp_path / "ro"
    base.mkdir()
    try:
        res = base / "results"
        cmd = [sys.executable, "-m", "harness", "run", "--task", "quadratic", "--searcher", "random",
               "--budget", "10", "--results-dir", str(res), "--quiet"]
        first = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert first.returncode == 0, first.stderr
        before = {p: p.read_bytes() for p in res.rglob("*") if p.is_file()}
        for p in [base, *res.rglob("*"), res]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        again = subprocess.run([*cmd[:-1], "--seed", "1", "--quiet"], capture_output=True, text=True,
                               timeout=120, cwd=ROOT, preexec_fn=honour_permissions)
        assert again.returncode == 2, again.stderr
        lines = again.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: cannot write results to {res}/runs/")
        assert "Permission denied" in lines[0]
        assert {p: p.read_bytes() for p in res.rglob("*") if p.is_file()} == before  # nothing lost
    finally:
        for p in [base, *base.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)


def test_a_record_names_its_commit_and_says_when_the_code_differs_from_it(tmp_path):
    """A run recorded from edited code must not claim the commit's code: git_sha adds ``+dirty``
    while a tracked file differs from HEAD (untracked files, such as results, do not count)."""
    from harness.provenance import git_sha
    assert git_sha(tmp_path) == "unknown"  # not a checkout
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "code.py"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "one"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / "results.json").write_text("{}")  # untracked
    assert git_sha(tmp_path) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_sha(tmp_path) == head + "+dirty"
