"""Sweeps resume instead of repeating; leaderboard pages and plots are real files."""
from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def harness(*args):
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_sweep_skips_recorded_runs_and_publishes(tmp_path):
    res = str(tmp_path)
    args = ("sweep", "--tasks", "quadratic", "--searchers", "random,nevergrad,task-arithmetic", "--seeds", "0,1",
            "--budget", "40", "--results-dir", res, "--quiet")
    r = harness(*args)
    assert r.returncode == 0, r.stderr
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 6
    stamps = {p.name: (p / "record.json").stat().st_mtime_ns for p in runs}
    r2 = harness(*args)
    assert r2.returncode == 0, r2.stderr
    assert r2.stderr.count("already complete") == 6
    assert {p.name: (p / "record.json").stat().st_mtime_ns for p in (tmp_path / "runs").iterdir()} == stamps
    # The leaderboard: three ranked rows, n = 2 seeds each.
    md = (tmp_path / "leaderboard.md").read_text()
    assert md.count("| quadratic |") == 3 and "| 2 | 2 |" in md
    page = (tmp_path / "leaderboard.html").read_text()

    class P(HTMLParser):
        imgs, cells = [], 0

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.imgs.append(dict(attrs)["src"])
            if tag == "td":
                self.cells += 1
    p = P()
    p.feed(page)
    assert p.cells >= 3 * 10 and len(p.imgs) == 1
    png = base64.b64decode(p.imgs[0].split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000  # a real plot, inlined: no external files
    assert not re.search(r"src=\"(?!data:)", page)


def test_coefficient_heat_map(tmp_path):
    r = harness("run", "--task", "quadratic", "--searcher", "random", "--budget", "20", "--results-dir", str(tmp_path), "--quiet")
    assert r.returncode == 0, r.stderr
    run_id = next((tmp_path / "runs").iterdir()).name
    r = harness("plot", run_id, "--results-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    out = Path(r.stdout.strip())
    assert out.read_bytes()[:4] == b"\x89PNG"
    r = harness("plot", "nope", "--results-dir", str(tmp_path))
    assert r.returncode == 2 and "no completed run 'nope'" in r.stderr
