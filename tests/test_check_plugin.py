"""``python -m harness check-plugin`` on pip-installed example plugins, from outside the repository."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The example packages installed into a private target (``--no-deps``: they depend on
    atlas-harness, which is installed already)."""
    target = tmp_path_factory.mktemp("site")
    for pkg in ("harness-hillclimb", "harness-mlp-source", "harness-broken-batch"):
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                              "--target", str(target), str(ROOT / "examples" / pkg)],
                             capture_output=True, text=True, timeout=300)
        assert pip.returncode == 0, pip.stderr
    return target


def check(site, tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, "-m", "harness", "check-plugin", *args], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=900)  # cwd outside the repository


def test_the_example_searcher_passes(site, tmp_path):
    r = check(site, tmp_path, "hillclimb")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4/4 checks passed" in r.stdout and "FAIL" not in r.stdout


def test_a_broken_searcher_fails_naming_the_promise(site, tmp_path):
    r = check(site, tmp_path, "broken-batch")
    assert r.returncode == 1
    assert "FAIL  searcher broken-batch: asks at most batch-size candidates" in r.stdout


def test_the_example_source_passes(site, tmp_path):
    r = check(site, tmp_path, "mlp-digits", "--cache-dir", str(tmp_path / "cache"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "10/10 checks passed" in r.stdout


def test_a_validate_that_raises_anything_is_one_line(tmp_path):
    mod = tmp_path / "badval.py"
    mod.write_text("from dataclasses import dataclass\nfrom atlas_harness_searchers.random_search import RandomSearcher\n"
                   "class Bad(RandomSearcher):\n    name = 'bad'\n    @classmethod\n    def validate(cls, options):\n"
                   "        raise ValueError('sigma is not a colour')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "harness", "run", "--task", "quadratic", "--searcher", "badval:Bad",
                        "--results-dir", str(tmp_path / "res"), "--quiet"], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=300)
    assert r.returncode == 2
    assert r.stderr == "error: searcher 'bad' rejected its options: ValueError: sigma is not a colour\n"


def test_the_setting_label_shows_every_non_default_option_falsy_ones_too(tmp_path):
    from harness.config import RunConfig
    from harness.leaderboards import leaderboard
    from harness.runner import run
    run(RunConfig(task="quadratic", searcher="gradient", budget=6, searcher_options={"clip": 0, "lr": 0.001},
                  task_options={"dim": 3}, results_dir=str(tmp_path), quiet=True), log=lambda m: None)
    setting = leaderboard(tmp_path)["setting"].iloc[0]
    assert "clip=0" in setting and "lr=" not in setting  # lr is at its default
