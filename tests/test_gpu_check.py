"""benchmarks/gpu_check.py in its CPU size: the printed table, the loss checks (and that a disagreeing
path fails them), the Ray rows on CPU workers, the loud NOT TESTED / SKIPPED lines, and one-line
errors with exit code 2 for a bad device.

One subprocess runs the script with every CPU-reachable part switched on (``--with-cpu`` builds a
second, CPU "reference" task so the device-vs-CPU code runs; ``--ray-cpu 2`` runs the Ray rows on
CPU workers); the plain ``--device cpu`` form CI uses runs in this process.
"""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # make test-fast leaves these out

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
ROW = re.compile(r"^(cpu|cpu-ref)\s+(\d+)\s+(\d+)\s+(sequential|population)\s+(\d+\.\d+)\s+(\d+\.\d+)\s+"
                 r"(?:(\d+\.\d+)x\s+)?(\d+\.\d+) GiB RSS\s*$")
CHECK = re.compile(r"^\s+(.+?)\s+max \|diff\|\s+(\S+)\s+tol (\S+)\s+(PASS|FAIL|INFO|SKIPPED)")


def _script(*args, timeout=900):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _rows(out: str) -> dict:
    rows = {}
    for line in out.splitlines():
        m = ROW.match(line)
        if m:
            label, images, batch, path, rate, img_rate, vs, peak = m.groups()
            rows[label, int(batch), path] = {"images": int(images), "rate": float(rate), "img_rate": float(img_rate),
                                             "vs": float(vs) if vs else None, "peak": float(peak)}
    return rows


def _checks(out: str) -> dict:
    return {m.group(1): (float(m.group(2)), float(m.group(3)), m.group(4))
            for m in map(CHECK.match, out.splitlines()) if m}


@pytest.fixture(scope="module")
def full():
    """The CPU-sized run with the CPU reference task and Ray CPU workers."""
    r = _script("--device", "cpu", "--with-cpu", "--ray-cpu", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.fixture
def gpu_check(monkeypatch):
    """The script as a module in this process (its source resolves as gpu_check:SyntheticClipSource)."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # the module puts benchmarks/ on sys.path: undone after
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)  # the small size runs on 1 thread


def test_table_has_every_row_with_positive_rates_and_memory(full):
    rows = _rows(full)
    assert set(rows) == {(label, b, path) for label in ("cpu", "cpu-ref") for b in (2, 4)
                         for path in ("sequential", "population")}
    for (label, b, path), r in rows.items():
        assert r["images"] == 8 * 16  # 8 data sets x 16 images
        assert r["rate"] > 0 and r["peak"] > 0.05  # GiB: at least torch itself is resident
        assert r["img_rate"] == pytest.approx(r["rate"] * r["images"], rel=2e-3, abs=0.1)
        if path == "population":
            seq = rows[label, b, "sequential"]["rate"]
            assert r["vs"] == pytest.approx(r["rate"] / seq, rel=0.02, abs=0.006)
        else:
            assert r["vs"] is None
    assert re.search(r"model tiny \(random weights\): image tower 0\.\d M params in 32 blocks; 8 task vectors; "
                     r"256 coefficients", full)


def test_loss_checks_pass_within_the_stated_tolerance(full):
    checks = _checks(full)
    want = [f"{label} population vs {label} sequential, batch {b}" for label in ("cpu", "cpu-ref") for b in (2, 4)]
    want += ["cpu sequential vs cpu-ref sequential (strict fp32)", "cpu population vs cpu-ref sequential (strict fp32)",
             "cpu gradient vs cpu-ref gradient (strict fp32, relative)",
             "ray 1 worker(s) vs cpu sequential, batch 4", "ray 2 worker(s) vs cpu sequential, batch 4",
             "cpu eval_chunk 64 vs chunk 0, batch 2", "cpu 8 probes together vs one by one"]
    assert set(checks) == set(want)
    for name, (diff, tol, status) in checks.items():
        assert status == "PASS" and 0 <= diff <= tol, name
        assert tol == (1e-3 if "gradient" in name else 1e-4)
    # Same device, same data, same weights: sequential scores and gradients agree exactly.
    assert checks["cpu sequential vs cpu-ref sequential (strict fp32)"][0] == 0
    assert checks["cpu gradient vs cpu-ref gradient (strict fp32, relative)"][0] == 0
    assert "max |loss difference| <= 0.0001 (absolute) passes" in full
    assert re.search(r"^PASS: 11 PASS, 0 FAIL, 0 SKIPPED, 0 INFO of 11 checks; wall time \d+\.\d s$", full, re.M)
    # dfo-gn's probes from a kept anchor, one by one and in shared passes: the same losses, both timed.
    assert checks["cpu 8 probes together vs one by one"][0] <= 1e-4
    probes = re.search(r"^dfo-gn probes from a kept anchor \(8, on 16 images\): one by one (\S+) evals/s, together "
                       r"(\S+) evals/s \((\d+\.\d\d)x\)$", full, re.M)
    assert probes and float(probes.group(1)) > 0 and float(probes.group(2)) > 0
    # The evaluation chunk: set (the automatic sizing is CUDA-only, and says it was not tested).
    assert re.search(r"^evaluation chunk \(-t eval_chunk\): set to 64 images; \d+\.\d\dx the evals/s of chunk 0", full, re.M)
    assert any(line.startswith("NOT TESTED: automatic evaluation chunk") for line in full.splitlines())


def test_ray_rows_and_what_was_not_tested_are_printed(full):
    rates = [float(m.group(2)) for m in re.finditer(r"^  (\d) worker\(s\)\s+(\d+\.\d+) evals/s", full, re.M)]
    assert len(rates) == 2 and all(r > 0 for r in rates)
    assert "Ray scaling, batch 4, CPU workers" in full
    lines = full.splitlines()
    assert "SKIPPED: Ray GPU scaling needs 2+ GPUs, found 0" in lines
    assert "NOT TESTED: CUDA (device is cpu; torch.cuda.is_available() = False)" in lines
    assert any(line.startswith("NOT TESTED: fp16 task-vector storage") for line in lines)
    # bf16 autocast measured through the engine's precision check, and reported kept or refused.
    amp = re.search(r"^  bf16: loss rel err (\S+), acc err (\S+) -> (kept|refused)", full, re.M)
    assert amp and float(amp.group(1)) > 0
    assert not any("device vs CPU" in line for line in lines)  # --with-cpu ran those checks


def test_plain_cpu_form_as_ci_runs_it(gpu_check, capsys):
    assert gpu_check.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert set(rows) == {("cpu", b, p) for b in (2, 4) for p in ("sequential", "population")}
    assert all(r["rate"] > 0 for r in rows.values())
    checks = _checks(out)
    assert len(checks) == 4 and all(s == "PASS" and d <= 1e-4 for d, _, s in checks.values())
    assert "NOT TESTED: device vs CPU losses and gradients (device is cpu; --with-cpu runs that code on two CPU tasks)" in out
    assert "SKIPPED: Ray GPU scaling needs 2+ GPUs, found 0" in out


def test_a_disagreeing_path_fails_the_check_and_the_exit_code(gpu_check, capsys, monkeypatch):
    from harness.engines.local import LocalEngine
    real = LocalEngine.population_ce

    def off_by_a_bit(self, cands, data, shard=None):
        evs = real(self, cands, data, shard)
        for e in evs:
            e.loss += 1e-3
        return evs

    monkeypatch.setattr(LocalEngine, "population_ce", off_by_a_bit)
    assert gpu_check.main(["--device", "cpu", "--with-cpu"]) == 1
    out = capsys.readouterr().out
    checks = _checks(out)
    assert checks["cpu population vs cpu sequential, batch 2"][0] == pytest.approx(1e-3, rel=1e-3)
    assert checks["cpu population vs cpu sequential, batch 2"][2] == "FAIL"
    assert checks["cpu population vs cpu-ref sequential (strict fp32)"][2] == "FAIL"
    assert checks["cpu sequential vs cpu-ref sequential (strict fp32)"][2] == "PASS"
    assert re.search(r"^FAIL: 4 PASS, 5 FAIL, 0 SKIPPED, 0 INFO of 9 checks", out, re.M)


def test_cuda_without_a_gpu_is_a_one_line_error_exit_2():
    r = _script("--device", "cuda", timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: error: device 'cuda' asked for, but CUDA is not available")


@pytest.mark.parametrize("argv, message", [
    (["--device", "bogus"], "unknown device 'bogus'; valid forms: cpu, cuda, cuda:N"),
    (["--device", "cuda:3"], "device 'cuda:3'"),
    (["--batches", "1,4"], "--batches needs sizes >= 2"),
    (["--batches", "x"], "--batches must be comma-separated integers, got 'x'"),
])
def test_bad_options_are_one_line_errors_exit_2(gpu_check, capsys, argv, message):
    assert gpu_check.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("gpu_check: error: ") and message in err
