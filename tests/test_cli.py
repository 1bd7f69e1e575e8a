"""The command line as a user types it: one-line errors, exit codes, records, leaderboard, plugins."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def harness(*args, cwd=None, env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=timeout)


@pytest.mark.parametrize("args, expect", [
    (["run", "--searcher", "nope"], "unknown searcher 'nope'; valid searchers: "),
    (["run", "--task", "nope", "--searcher", "random"], "unknown task 'nope'; valid tasks: "),
    (["run", "--task", "quadratic", "-s", "foo=1"], "unknown searcher option 'foo' for nevergrad; valid: optimizer, bound, l1; and the harness's: warm, screen, finalists"),
    (["run", "--task", "quadratic", "-t", "dim=abc"], "task option 'dim' must be int, got 'abc'"),
    (["run", "--task", "quadratic", "--budget", "ten"], "argument --budget: invalid int value"),
    (["run", "--task", "quadratic", "-s", "optimizer=NGOptt"], "unknown nevergrad optimizer 'NGOptt'"),
    (["run", "--task", "quadratic", "--bogus"], "unrecognized arguments: --bogus"),
    (["run", "--config", "missing.toml"], "config file not found: missing.toml"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, expect):
    r = harness(*args, "--results-dir", str(tmp_path)) if args[0] == "run" else harness(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert expect in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_run_and_leaderboard(tmp_path):
    res = str(tmp_path)
    r = harness("run", "--task", "quadratic", "--searcher", "nevergrad", "--budget", "200", "--results-dir", res, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "this run (nevergrad)" in r.stdout
    r = harness("run", "--task", "quadratic", "--searcher", "random", "--budget", "200", "--results-dir", res, "--quiet")
    assert r.returncode == 0, r.stderr
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 2
    rec = json.loads((tmp_path / "runs" / runs[0] / "record.json").read_text())
    for key in ("run_id", "created", "git_sha", "versions", "config", "seed", "budget", "evaluations",
                "wall_time_s", "best_search_loss", "final", "coefficients", "error"):
        assert key in rec
    assert rec["status"] == "complete" and rec["evaluations"] == 200 and rec["error"] == ""
    assert Path(rec["coefficients"]).exists()
    trace = (tmp_path / "runs" / runs[0] / "trace.jsonl").read_text().splitlines()
    assert len(trace) == 200
    r = harness("leaderboard", "--results-dir", res)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0].split()[:3] == ["task", "rank", "searcher"]
    assert [l.split()[2] for l in out[1:3]] == ["nevergrad", "random"]  # nevergrad solves it exactly
    assert (tmp_path / "leaderboard.md").read_text().startswith("| task | rank |")
    assert (tmp_path / "leaderboard.csv").exists()


def test_toml_config_equals_flags(tmp_path):
    conf = tmp_path / "run.toml"
    conf.write_text('task = "quadratic"\nsearcher = "random"\nbudget = 30\nseed = 4\n'
                    '[searcher_options]\nsigma = 0.3\n[task_options]\ndim = 3\n')
    a = harness("run", "--config", str(conf), "--results-dir", str(tmp_path / "a"), "--quiet")
    b = harness("run", "--task", "quadratic", "--searcher", "random", "--budget", "30", "--seed", "4",
                "-s", "sigma=0.3", "-t", "dim=3", "--results-dir", str(tmp_path / "b"), "--quiet")
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    ra = json.loads(next((tmp_path / "a" / "runs").iterdir()).joinpath("record.json").read_text())
    rb = json.loads(next((tmp_path / "b" / "runs").iterdir()).joinpath("record.json").read_text())
    assert ra["run_id"] == rb["run_id"] and ra["final"] == rb["final"]
    assert ra["config"]["searcher_options"] == {"mode": "local", "sigma": 0.3}  # defaults resolved and stored


def test_third_party_plugin_package(tmp_path):
    """The example package is pip-installed (into a private target) and appears without edits to harness/."""
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--target", str(target), str(ROOT / "examples" / "harness-hillclimb")],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    import os
    env = {**os.environ, "PYTHONPATH": str(target)}
    r = harness("list", env=env)
    assert "hillclimb" in r.stdout and "example plugin" in r.stdout
    r = harness("run", "--task", "quadratic", "--searcher", "hillclimb", "--budget", "150",
                "--results-dir", str(tmp_path / "res"), "--quiet", env=env)
    assert r.returncode == 0, r.stderr
    rec = json.loads(next((tmp_path / "res" / "runs").iterdir()).joinpath("record.json").read_text())
    assert rec["searcher"] == "hillclimb" and rec["final"]["distance"] < 0.1
