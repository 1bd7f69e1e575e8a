"""A cache for the fixed cost every run pays: reference figures that depend only on content.

A source's zero-shot and fine-tuned test accuracies, and a task's references (zero-shot, the
task-arithmetic grid, the fine-tuned models), are the same for every run on the same weights, data,
options and seed. They are computed once and kept as JSON under ``<cache>/references/``, keyed by
the sha256 of their *key material*: what they were computed from (content hashes of weights and
data, the options, the seed, the device type) and the code that computed them (a hash of the
harness's and the task's source files). Anything that could change a figure changes the key, so a
stale entry is missed, never read under another name.

Each entry holds its material, its key and its value, and a sha256 ``checksum`` of the three. An
entry is used only when its checksum matches its content and its key and material are the ones
asked for; any other entry (damaged, edited, from before checksums, or filed under another key)
is recomputed and rewritten, with one warning line on stderr. Entries are written atomically.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

_ROOT = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=None)
def _files_hash(paths: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.encode())
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


def code_version(*objects) -> str:
    """A hash of every ``.py`` file of the harness package and of the files defining ``objects``
    (a task class from another package, say): the code that computes references."""
    files = {str(p) for p in _ROOT.rglob("*.py")}
    for obj in objects:
        try:
            files.add(str(Path(inspect.getsourcefile(obj)).resolve()))
        except (TypeError, OSError):
            pass
    return _files_hash(tuple(sorted(files)))


def key_of(material: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:24]


def checksum(body: dict[str, Any]) -> str:
    """The sha256 of an entry's ``material``, ``key`` and ``value`` (canonical JSON)."""
    text = json.dumps({k: body.get(k) for k in ("material", "key", "value")}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _as_json(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists, other objects their ``str``)."""
    return json.loads(json.dumps(obj, default=str))


def _problem(entry: Any, key: str, material: dict) -> str | None:
    """Why ``entry`` may not be used for ``key``/``material``; None when it may."""
    if not isinstance(entry, dict) or not {"material", "value"} <= entry.keys():
        return "is not a cache entry"
    if "checksum" not in entry:
        return "has no checksum"
    if entry["checksum"] != checksum(entry):
        return "does not match its checksum (damaged)"
    if entry.get("key") != key or entry["material"] != material:
        return "was computed from other material (its key does not match)"
    return None


def cached(cache_dir: str | os.PathLike, kind: str, material: dict[str, Any],
           compute: Callable[[], Any]) -> tuple[Any, bool]:
    """``(value, hit)``: the cached value for ``material``, else ``compute()`` stored for next time.

    An entry that does not verify (see the module docstring) is recomputed and replaced; a
    warning line on stderr names it and says why."""
    folder = Path(cache_dir) / "references"
    full = _as_json({"kind": kind, **material})
    key = key_of(full)
    path = folder / f"{kind}-{key}.json"
    try:
        text = path.read_text()
    except OSError:
        text = None  # no entry yet (or unreadable): computed without a word
    if text is not None:
        try:
            problem = _problem(json.loads(text), key, full)
        except ValueError:
            problem = "is not valid JSON"
        if problem is None:
            return json.loads(text)["value"], True
        print(f"warning: reference cache entry {path} {problem}; recomputing it", file=sys.stderr, flush=True)
    value = compute()
    body = {"material": full, "key": key, "value": _as_json(value)}
    body["checksum"] = checksum(body)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(body, f)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:  # a read-only cache only costs the recomputation next time
        pass
    return value, False
