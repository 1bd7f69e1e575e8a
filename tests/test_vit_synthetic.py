"""benchmarks/vit_synthetic.py: its budgets, its curve readings and its one-line errors (the
ViT-B-32-shaped build itself takes minutes and 3 GB, so it is not run here)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "vit_synthetic.py"


@pytest.fixture(scope="module")
def vs():
    spec = importlib.util.spec_from_file_location("vit_synthetic", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_budgets_in_evaluations_or_rounds(vs):
    got = vs.parse_budgets("dfo-gn=2r,gradient=40", 1216)
    assert got == {"dfo-gn": 2 * 1217 + 1, "gradient": 40}


def test_the_curve_readings(vs):
    trace = pd.DataFrame({"t": [1.0, 2.0, 3.0, 4.0], "best": [3.0, 2.0, 2.0, 1.0], "loss": [3.0, 2.0, 2.5, 1.0]})
    assert vs.best_at(trace, 2.5) == 2.0 and vs.best_at(trace, 0.5) is None
    assert vs.time_to(trace, 2.0) == 2.0 and vs.time_to(trace, 0.5) is None


@pytest.mark.parametrize("args, message", [
    (["--image-size", "48"], "--image-size must be a positive multiple of 32"),
    (["--budgets", "foo=3"], "bad budget 'foo=3'"),
    (["--budgets", "dfo-gn=0r"], "bad budget 'dfo-gn=0r'"),
    (["--searchers", "bogus"], "unknown searcher(s) bogus; valid: gradient, dfo-gn, nevergrad"),
])
def test_bad_options_are_one_line_and_exit_2_before_anything_is_written(tmp_path, args, message):
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--work", str(work), *args], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert not work.exists()
