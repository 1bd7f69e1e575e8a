"""The results store: one folder per run, an append-only trace and a run record.

Layout under the results directory::

    runs/<run_id>/config.json             resolved config, written before the first evaluation
    runs/<run_id>/trace.jsonl             one line per evaluation, flushed as it happens
    runs/<run_id>/record.json             the run record (status "running" until the end)
    runs/<run_id>/coefficients.safetensors the recommended coefficients

A killed run leaves a valid prefix of its trace (at worst one torn last line, which readers
report and skip), so it can be resumed by replaying the trace into the searcher.
"""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from harness.api import HarnessError

RECORD_FIELDS = ("run_id", "status", "task", "searcher", "seed", "key", "created", "finished", "git_sha",
                 "versions", "host", "config", "budget", "evaluations", "failed_evaluations", "wall_time_s",
                 "best_search_loss", "headline", "higher_is_better", "final", "constraint_ok",
                 "coefficients", "searcher_info", "peak_rss_mb", "error")


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def dumps(obj) -> str:
    """JSON with exact float round-trip; non-finite numbers become null (JSON has no NaN)."""
    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o
    return json.dumps(clean(json.loads(json.dumps(obj, default=_json_default))), sort_keys=False)


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("atlas-harness", "torch", "numpy", "nevergrad", "open_clip_torch", "ray", "pandas"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def read_jsonl(path: Path, warn=True) -> list[dict]:
    """Rows of a JSON-lines file; a torn or corrupt line is reported on stderr and skipped."""
    rows = []
    if not path.exists():
        return rows
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
                if not isinstance(row, dict):
                    raise ValueError("not an object")
                rows.append(row)
            except (ValueError, UnicodeDecodeError):
                if warn:
                    print(f"warning: skipped corrupt line {n} of {path}", file=sys.stderr)
    return rows


class RunStore:
    """Files of one run. Every write either appends a flushed line or replaces a file atomically."""

    def __init__(self, results_dir: str | Path, run_id: str):
        self.dir = Path(results_dir) / "runs" / run_id
        self.run_id = run_id
        self.trace_path = self.dir / "trace.jsonl"
        self.record_path = self.dir / "record.json"
        self._trace = None

    def open(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            # A torn last line from a killed run must not merge with the next appended row.
            if self.trace_path.exists() and self.trace_path.stat().st_size:
                with open(self.trace_path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    torn = f.read(1) != b"\n"
                if torn:
                    with open(self.trace_path, "ab") as f:
                        f.write(b"\n")
            self._trace = open(self.trace_path, "a", encoding="utf-8")
        except OSError as e:
            raise HarnessError(f"cannot write results to {self.dir}: {e.strerror}") from None

    def close(self) -> None:
        if self._trace:
            self._trace.close()
            self._trace = None

    def append(self, row: dict[str, Any]) -> None:
        self._trace.write(dumps(row) + "\n")
        self._trace.flush()

    def trace(self) -> list[dict]:
        return read_jsonl(self.trace_path)

    def write_json(self, name: str, obj: dict) -> None:
        path = self.dir / name
        tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
        tmp.write_text(dumps(obj) + "\n")
        os.replace(tmp, path)

    def record(self) -> dict | None:
        if not self.record_path.exists():
            return None
        try:
            return json.loads(self.record_path.read_text())
        except (ValueError, OSError):
            print(f"warning: unreadable run record {self.record_path}", file=sys.stderr)
            return None

    def save_coefficients(self, x: np.ndarray, expanded: np.ndarray | None = None) -> str:
        from safetensors.numpy import save_file
        tensors = {"x": np.ascontiguousarray(x, dtype=np.float64)}
        if expanded is not None:
            tensors["coefficients"] = np.ascontiguousarray(expanded, dtype=np.float64)
        path = self.dir / "coefficients.safetensors"
        tmp = self.dir / f"coefficients.tmp{os.getpid()}"
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
        return str(path)


def load_coefficients(path: str | Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    return load_file(str(path))


def iter_records(results_dir: str | Path, complete_only: bool = True) -> Iterator[dict]:
    """Every readable run record under ``results_dir`` (unreadable ones are reported and skipped)."""
    root = Path(results_dir) / "runs"
    if not root.is_dir():
        return
    for d in sorted(root.iterdir()):
        rec = RunStore(results_dir, d.name).record() if d.is_dir() else None
        if rec and (not complete_only or rec.get("status") == "complete"):
            yield rec


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def reset_peak_rss() -> None:
    """Start this process's peak-memory count afresh (Linux: ``5`` to /proc/self/clear_refs resets
    VmHWM), so runs that share a process (sweeps, benches) each record their own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB. Linux's VmHWM starts afresh at exec, unlike
    ``ru_maxrss``, which a process started by a large parent inherits from it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
