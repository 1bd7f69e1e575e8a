"""Reading run records back: which records are usable, and a one-line reason for each that is not.

Leaderboards, plots, sweeps and results pages read runs through :func:`read_records`, which keeps
the records that :func:`check_record` accepts and names every other one (with the field that is
wrong) instead of letting one damaged file take the whole table down.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Iterator

from harness.api import HarnessError


STATUSES = ("running", "complete", "failed", "interrupted")


def one_line(value, limit: int = 60) -> str:
    """``repr(value)`` shortened to ``limit`` characters, on one line (for messages)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    """A finite real number that fits a float (not a bool)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:  # an integer beyond the float range
        return False


class BadRecord(ValueError):
    """A run record that readers cannot use; the message names the field and what it must be."""


def _need(rec: dict, name: str, ok, expected: str, *, optional: bool = False, where: str = ""):
    """``rec[name]`` if ``ok(value)``; raise :class:`BadRecord` naming the field otherwise.
    An ``optional`` field may be missing or null (then None is returned)."""
    field_name = where + name
    if name not in rec:
        if optional:
            return None
        raise BadRecord(f"field {field_name} is missing (expected {expected})")
    v = rec[name]
    if v is None and optional:
        return None
    if not ok(v):
        raise BadRecord(f"field {field_name} must be {expected}, got {one_line(v)}")
    return v


def check_record(rec) -> dict:
    """``rec`` if it is a complete run record that leaderboards and plots can use, else raise
    :class:`BadRecord` naming the first field that is missing or of the wrong kind.

    Checked are the fields that rankings and curves read: the identity (``run_id``, ``task``,
    ``searcher``, ``key``, ``seed``), ``config`` (``space``, ``budget``, ``batch_size``, and the
    ``searcher_options``/``task_options`` tables with a text ``transform`` and ``target``), the
    result (``headline``, ``higher_is_better``, ``final[headline]``, ``constraint_ok``) and the
    cost (``evaluations``, ``wall_time_s``, ``peak_rss_mb``), ``family`` and ``data_touched``.
    Numbers must be finite, integers in range (seeds 0..2**32-1, counts 0..2**63-1). Other fields
    (provenance, references, searcher info) are free-form and are not read for rankings.
    """
    if not isinstance(rec, dict):
        raise BadRecord(f"not a JSON object (got {type(rec).__name__})")
    text = lambda v: isinstance(v, str) and v != ""  # noqa: E731
    count = lambda v: _is_int(v) and 0 <= v < 2**63  # noqa: E731
    for name in ("run_id", "task", "searcher", "key"):
        _need(rec, name, text, "non-empty text")
    _need(rec, "seed", lambda v: _is_int(v) and 0 <= v < 2**32, "an integer in 0..4294967295")
    cfg = _need(rec, "config", lambda v: isinstance(v, dict), "a table (JSON object)")
    _need(cfg, "space", text, "non-empty text", where="config.")
    _need(cfg, "budget", count, "an integer >= 0", where="config.")
    _need(cfg, "batch_size", lambda v: _is_int(v) and 1 <= v < 2**63, "an integer >= 1", optional=True, where="config.")
    _need(cfg, "searcher_options", lambda v: isinstance(v, dict), "a table (JSON object)", optional=True, where="config.")
    topts = _need(cfg, "task_options", lambda v: isinstance(v, dict), "a table (JSON object)", optional=True,
                  where="config.") or {}
    for name in ("transform", "target"):
        _need(topts, name, lambda v: isinstance(v, str), "text", optional=True, where="config.task_options.")
    head = _need(rec, "headline", text, "non-empty text (the name of a final metric)")
    _need(rec, "higher_is_better", lambda v: isinstance(v, bool), "true or false")
    final = _need(rec, "final", lambda v: isinstance(v, dict), "a table (JSON object)")
    _need(final, head, _is_number, "a finite number (the headline metric)", where="final.")
    _need(rec, "constraint_ok", lambda v: isinstance(v, bool), "true, false or null", optional=True)
    _need(rec, "evaluations", count, "an integer >= 0")
    _need(rec, "wall_time_s", lambda v: _is_number(v) and v >= 0, "a finite number >= 0")
    _need(rec, "peak_rss_mb", lambda v: _is_number(v) and v >= 0, "a finite number >= 0 or null", optional=True)
    _need(rec, "data_touched", text, "non-empty text", optional=True)
    fam = _need(rec, "family", lambda v: isinstance(v, dict), "a table (JSON object) or null", optional=True)
    if fam and fam.get("pretrained") is not None:
        _need(fam, "pretrained", text, "non-empty text", where="family.")
        _need(fam, "task_vectors", text, "non-empty text", where="family.")
    return rec


def read_records(results_dir: str | Path, complete_only: bool = True, warn: bool = True) -> list[tuple[Path, dict]]:
    """``(run folder, record)`` for every usable run record under ``results_dir/runs``, by folder name.

    Folders without a ``record.json`` (a stray folder) and hidden folders (``.ipynb_checkpoints``)
    are passed over in silence, unless they hold a trace (one warning line: a run records itself
    before its first evaluation); so are records of runs that are not
    complete when ``complete_only``. A record that cannot be used — not a file, empty, truncated,
    not JSON, or a field :func:`check_record` refuses — is reported in one warning line on stderr
    naming its path and the reason (``warn=False``: silently) and left out; it is never changed.
    With ``complete_only=False`` the records of runs that are not complete come back unchecked.
    """
    root = Path(results_dir) / "runs"
    try:
        if not root.is_dir():
            return []
        folders = sorted(root.iterdir())
    except OSError as e:
        raise HarnessError(f"cannot read the runs under {root}: {e.strerror or e}") from None
    out = []
    for d in folders:
        path = d / "record.json"
        try:
            if d.name.startswith(".") or not d.is_dir():
                continue
            if not (path.exists() or path.is_symlink()):
                # A run writes its record before its first evaluation: a trace without one is damage.
                if (d / "trace.jsonl").is_file() and (d / "trace.jsonl").stat().st_size and warn:
                    print(f"warning: skipped run folder {_printable(d)}: it has a trace but no record.json",
                          file=sys.stderr)
                continue
            if not path.is_file():
                raise BadRecord("it is not a file")
            raw = path.read_bytes()
            if not raw.strip():
                raise BadRecord("the file is empty")
            try:
                rec = json.loads(raw)
            except (ValueError, RecursionError) as e:
                raise BadRecord(f"not valid JSON ({' '.join(str(e).split())[:80]})") from None
            if not isinstance(rec, dict):
                raise BadRecord(f"not a JSON object (got {type(rec).__name__})")
            status = _need(rec, "status", lambda v: v in STATUSES, f"one of {', '.join(STATUSES)}")
            if complete_only and status != "complete":
                continue
            out.append((d, check_record(rec) if status == "complete" else rec))
        except BadRecord as e:
            if warn:
                print(f"warning: skipped unreadable run record {_printable(path)}: {e}", file=sys.stderr)
        except OSError as e:
            if warn:
                print(f"warning: skipped unreadable run record {_printable(path)}: {e.strerror or e}", file=sys.stderr)
    return _once_per_run(out, warn)


def _once_per_run(found: list[tuple[Path, dict]], warn: bool) -> list[tuple[Path, dict]]:
    """One entry per run id: a copied run folder holds the same record as its original, and
    counting it would weigh that run twice. The folder named after the run wins (else the first
    by name); each other one is reported in one warning line."""
    by_id: dict[str, list[tuple[Path, dict]]] = {}
    for d, rec in found:
        by_id.setdefault(str(rec.get("run_id")), []).append((d, rec))
    out = []
    for d, rec in found:
        same = by_id[str(rec.get("run_id"))]
        keep = next((e for e in same if e[0].name == str(rec.get("run_id"))), same[0])
        if keep[0] == d:
            out.append((d, rec))
        elif warn:
            print(f"warning: skipped run folder {_printable(d)}: it holds the record of run {rec.get('run_id')}, "
                  f"already read from {_printable(keep[0])} (a copy is counted once)", file=sys.stderr)
    return out


def _printable(path: Path) -> str:
    """A path as one line of text (control characters escaped)."""
    s = str(path)
    return s if s.isprintable() else s.encode("unicode_escape", "backslashreplace").decode("ascii")


def iter_records(results_dir: str | Path, complete_only: bool = True) -> Iterator[dict]:
    """Every usable run record under ``results_dir`` (see :func:`read_records`: unusable ones are
    reported once and skipped)."""
    for _, rec in read_records(results_dir, complete_only):
        yield rec
