"""A cache for the fixed cost every run pays: reference figures that depend only on content.

A source's zero-shot and fine-tuned test accuracies, and a task's references (zero-shot, the
task-arithmetic grid, the fine-tuned models), are the same for every run on the same weights, data,
options and seed. They are computed once and kept as JSON under ``<cache>/references/``, keyed by
the sha256 of their *key material*: what they were computed from (content hashes of weights and
data, the options, the seed, the device type) and the code that computed them (a hash of the
harness's and the task's source files). Anything that could change a figure changes the key, so a
stale entry is missed, never read under another name. Entries are written atomically; an
unreadable one is recomputed.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
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


def cached(cache_dir: str | os.PathLike, kind: str, material: dict[str, Any],
           compute: Callable[[], Any]) -> tuple[Any, bool]:
    """``(value, hit)``: the cached value for ``material``, else ``compute()`` stored for next time."""
    folder = Path(cache_dir) / "references"
    path = folder / f"{kind}-{key_of({'kind': kind, **material})}.json"
    try:
        entry = json.loads(path.read_text())
        if entry.get("material") == json.loads(json.dumps({"kind": kind, **material}, default=str)):
            return entry["value"], True
    except (OSError, ValueError, AttributeError):
        pass
    value = compute()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            json.dump({"material": {"kind": kind, **material}, "value": value}, f, default=str)
        os.replace(tmp, path)
    except OSError:  # a read-only cache only costs the recomputation next time
        pass
    return value, False
