"""The transforms against FusionBench's own functions (benchmarks/fusionbench_check.py).

FusionBench 0.2.33's wheel is fetched from the package index (1.2 MB, no dependencies installed:
the script executes only its leaf modules, with torch) into the pytest cache, once.
"""
from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0.2.33"  # the FusionBench release whose merging functions the transforms are compared with


def _fusion_bench(cache: Path) -> Path:
    pkg = cache / "src" / "fusion_bench"
    if not pkg.is_dir():
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check",
                        f"fusion-bench=={VERSION}", "-d", str(cache)], check=True, timeout=300)
        zipfile.ZipFile(next(cache.glob("fusion_bench-*.whl"))).extractall(cache / "src")
    return pkg


def test_transforms_match_fusion_bench(pytestconfig):
    pkg = _fusion_bench(Path(pytestconfig.cache.mkdir("fusion-bench")))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fusionbench_check.py"), "--fusion-bench", str(pkg),
                        "--dare-seeds", "60"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    cells = [re.split(r"\s{2,}", line) for line in r.stdout.splitlines()
             if line.startswith(("ties", "iso", "dare", "tsvm", "consensus", "wudi"))]
    rows = {f"{c[0]} {c[1]}": " " + "  ".join(c) + " " for c in cells}
    ties = [line for key, line in rows.items() if key.startswith("ties")]
    assert len(ties) == 12 and all(" MATCH " in line for line in ties), ties
    assert " MATCH " in rows["iso iso:other=mean,conv=other"]
    assert "DIFFERS (by design)" in rows["iso iso"]
    assert sum(" MATCH " in line for key, line in rows.items() if key.startswith("dare")) == 6
    for key in ("iso-cts iso-cts:conv=other", "tsvm tsvm:conv=other", "tsvm per-task shares (matrices)",
                "wudi wudi:conv=other", "wudi wudi:conv=other, vectors x 1e-3", "consensus consensus:lam=0.6,k=2",
                "consensus consensus:lam=0.2,k=1", "consensus consensus:lam=0.4,k=3"):
        assert " MATCH " in rows[key], (key, rows.get(key))
    for spec in ("iso-cts", "tsvm", "wudi"):  # kernels decomposed as matrices, on purpose
        assert "DIFFERS (by design)" in rows[f"{spec} {spec}"]


def test_bad_fusion_bench_path_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fusionbench_check.py"), "--fusion-bench",
                        str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot import FusionBench from" in r.stderr
