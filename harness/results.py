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

import dataclasses
import json
import math
import os
import platform
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.api import HarnessError

@dataclass
class TraceRow:
    """One evaluation as the trace holds it (one JSON line)."""

    i: int
    x: np.ndarray
    loss: float | None
    grad: np.ndarray | None = None
    ok: bool = True
    error: str = ""
    metrics: dict = field(default_factory=dict)
    weight: float = 1.0
    want_grad: bool = False
    batch: int | None = None
    fidelity: float = 1.0
    best: float | None = None
    t: float = 0.0
    cand: int | None = None  # the searcher's candidate id (pipelined runs, whose rows are in finish order)

    @classmethod
    def from_dict(cls, row: dict) -> "TraceRow":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in row.items() if k in names}
        kw["x"] = np.asarray(row["x"], dtype=np.float64)
        kw["grad"] = None if row.get("grad") is None else np.asarray(row["grad"], dtype=np.float64)
        return cls(**kw)


@dataclass
class RunRecord:
    """The run record (``record.json``): identity, config, status, cost, results and provenance.

    Written when a run starts (status ``running``) and rewritten when it ends (``complete``,
    ``failed`` or ``interrupted``). ``extra`` holds facts a task's ``after_setup`` hook reports
    under names of its own; they are stored at the top level of the JSON.
    """

    run_id: str
    task: str
    searcher: str
    seed: int
    key: str
    config: dict
    budget: int
    headline: str
    higher_is_better: bool
    status: str = "running"
    created: str = ""
    finished: str | None = None
    git_sha: str = ""
    versions: dict = field(default_factory=dict)
    host: str = ""
    evaluations: int = 0
    failed_evaluations: int = 0
    wall_time_s: float = 0.0
    best_search_loss: float | None = None
    final: dict = field(default_factory=dict)
    constraint_ok: bool | None = None
    coefficients: str | None = None
    searcher_info: dict = field(default_factory=dict)
    peak_rss_mb: float | None = None
    error: str = ""
    resumed_from: int = 0
    plugins: dict = field(default_factory=dict)
    family: dict | None = None
    evaluator: dict = field(default_factory=dict)
    references: dict = field(default_factory=dict)
    task_vectors: list | None = None
    task_info: dict | None = None
    selection: dict | None = None
    data_touched: str = "none"
    traceback: str | None = None
    extra: dict = field(default_factory=dict)

    def update(self, **values) -> None:
        """Set fields; names that are not fields go to ``extra``."""
        for k, v in values.items():
            if k in _RECORD_NAMES and k != "extra":
                setattr(self, k, v)
            else:
                self.extra[k] = v

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**d, **self.extra}


_RECORD_NAMES = {f.name for f in dataclasses.fields(RunRecord)}


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


def _valid_row(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except (ValueError, UnicodeDecodeError):
        return False


def read_jsonl(path: Path, warn=True) -> list[dict]:
    """Rows of a JSON-lines file; a torn or corrupt line is reported on stderr and skipped, and a
    file that cannot be opened (a folder, no permission) is reported and read as no rows."""
    rows = []
    if not path.exists():
        return rows
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw)
                    if not isinstance(row, dict):
                        raise ValueError("not an object")
                    rows.append(row)
                except (ValueError, UnicodeDecodeError, RecursionError):
                    if warn:
                        print(f"warning: skipped corrupt line {n} of {path}", file=sys.stderr)
    except OSError as e:
        print(f"warning: cannot read {path}: {e.strerror or e}", file=sys.stderr)
    return rows


class RunInUse(HarnessError):
    """Another process owns the run folder (see :meth:`RunStore.lock`)."""


_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=,+-]*")


def check_run_id(run_id: str) -> str:
    """``run_id`` if it names a run folder (no path components), else a one-line HarnessError."""
    if not _RUN_ID.fullmatch(run_id or "") or ".." in run_id:
        raise HarnessError(f"invalid run id {run_id!r}: a run id is a folder name under RESULTS/runs "
                           "(letters, digits and . _ = , + -; no / or ..)")
    return run_id


class RunStore:
    """Files of one run. Every write either appends a flushed line or replaces a file atomically.

    A run folder is owned by one process at a time: :meth:`lock` takes an exclusive ``flock`` on
    ``runs/<id>/.lock`` (the kernel releases it when the process dies, so a killed run never
    leaves it stuck) and a second process gets a one-line error naming the holder.
    """

    def __init__(self, results_dir: str | Path, run_id: str):
        self.dir = Path(results_dir) / "runs" / check_run_id(run_id)
        self.run_id = run_id
        self.trace_path = self.dir / "trace.jsonl"
        self.record_path = self.dir / "record.json"
        self._trace = None
        self._lock = None

    def lock(self) -> None:
        """Own this run folder until :meth:`close`, or raise HarnessError naming the holder."""
        import fcntl
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise HarnessError(f"cannot write results to {self.dir}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunInUse(f"run {self.run_id} is being run by {holder}; wait for it to finish "
                               "(or stop it), then run the command again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {platform.node()}".encode(), 0)
        self._lock = fd

    def open(self) -> None:
        """Open the trace for appending; a torn or corrupt line is repaired first (see :meth:`repair`)."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.repair()
            self._trace = open(self.trace_path, "a", encoding="utf-8")
        except OSError as e:
            raise HarnessError(f"cannot write results to {self.dir}: {e.strerror}") from None

    def repair(self) -> None:
        """Keep the trace's valid prefix: a torn last line (a killed write) is truncated, and from
        the first corrupt line on, the rest is moved aside to ``trace.jsonl.corrupt`` with a
        one-line warning, so a resumed run replays every good row before it and goes on from there."""
        if not self.trace_path.exists():
            return
        data = self.trace_path.read_bytes()
        good, pos = 0, 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n") or not _valid_row(line):
                break
            pos += len(line)
            good += 1
        if pos == len(data):
            return
        rest = data[pos:]
        torn_only = b"\n" not in rest[:-1] and not rest.endswith(b"\n") or rest.strip() == b""
        if not torn_only:
            (self.dir / "trace.jsonl.corrupt").write_bytes(rest)
            print(f"warning: {self.trace_path} line {good + 1} is corrupt; resuming from the {good} rows "
                  f"before it (the rest is kept in trace.jsonl.corrupt)", file=sys.stderr)
        tmp = self.trace_path.with_suffix(f".jsonl.tmp{os.getpid()}")
        tmp.write_bytes(data[:pos])
        os.replace(tmp, self.trace_path)

    def close(self) -> None:
        if self._trace:
            try:
                self._trace.close()
            except OSError:  # the row that did not fit stays unwritten; repair() handles a torn one
                pass
            self._trace = None
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None

    def append(self, row: TraceRow) -> None:
        """Append one evaluation and flush it to disk."""
        try:
            d = dataclasses.asdict(row)
            if d["cand"] is None:  # only pipelined runs name their candidates
                del d["cand"]
            self._trace.write(dumps(d) + "\n")
            self._trace.flush()
        except OSError as e:
            raise HarnessError(f"cannot write the trace of run {self.run_id}: {e.strerror} (disk full?); the rows "
                               "written so far are kept: free space and run the same command to resume") from None

    def trace(self, warn: bool = True) -> list[dict]:
        """The trace's rows as dicts (a torn or corrupt line is reported and skipped)."""
        return read_jsonl(self.trace_path, warn=warn)

    def trace_rows(self) -> list[TraceRow]:
        return [TraceRow.from_dict(r) for r in self.trace()]

    def clear(self) -> None:
        """Delete this run's trace, record and coefficients (``--rerun``); its config is rewritten."""
        for path in (self.trace_path, self.record_path, self.dir / "coefficients.safetensors"):
            path.unlink(missing_ok=True)

    def write_config(self, config: dict) -> None:
        self.write_json("config.json", config)

    def write_record(self, record: RunRecord) -> None:
        self.write_json("record.json", record.to_dict())

    def write_json(self, name: str, obj: dict) -> None:
        path = self.dir / name
        tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
        try:
            tmp.write_text(dumps(obj) + "\n")
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise HarnessError(f"cannot write {path}: {e.strerror} (disk full?)") from None

    def record(self) -> dict | None:
        """The run record, or None (an unreadable one is reported on stderr). Its ``coefficients``
        path is this run folder's own file when that exists, so a results folder that was moved
        or copied still finds its coefficients (the record stores the path it was written at)."""
        if not self.record_path.exists():
            return None
        try:
            rec = json.loads(self.record_path.read_text())
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except (ValueError, OSError, RecursionError):
            print(f"warning: unreadable run record {self.record_path}", file=sys.stderr)
            return None
        own = self.dir / "coefficients.safetensors"
        if rec.get("coefficients") is not None and own.is_file():
            rec["coefficients"] = str(own)
        return rec

    def recorded_config(self) -> dict | None:
        """The settings this run was started with: ``config.json``, else the record's copy (None
        when neither is readable)."""
        try:
            config = json.loads((self.dir / "config.json").read_text())
        except (OSError, ValueError, RecursionError):
            config = None
        if not isinstance(config, dict):
            config = (self.record() or {}).get("config")
        return config if isinstance(config, dict) else None

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


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write ``path`` whole or not at all: into a temporary file next to it, then renamed over it.
    An OSError (read-only folder, disk full) leaves the old file as it was and no temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise
