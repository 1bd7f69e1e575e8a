"""Plugin discovery through Python entry points.

Built-in searchers and tasks are registered in ``pyproject.toml`` exactly as a third-party
package registers its own, so there is one door for both. ``module:Class`` strings load an
unpackaged plugin directly. Entry points are listed without being imported; a plugin is loaded
only when asked for, and a failure to load names the plugin.
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from harness.api import Engine, HarnessError, Searcher, Source, Task

GROUPS = {"searcher": "harness.searchers", "task": "harness.tasks", "source": "harness.sources",
          "engine": "harness.engines"}
_BASES = {"searcher": Searcher, "task": Task, "source": Source, "engine": Engine}


def names(kind: str) -> list[str]:
    """Sorted names of every registered plugin of ``kind`` (searcher, task, source or engine)."""
    return sorted({ep.name for ep in entry_points(group=GROUPS[kind])})


def _entry_point(kind: str, name: str):
    eps = [ep for ep in entry_points(group=GROUPS[kind]) if ep.name == name]
    return eps[0] if eps else None


def load(kind: str, name: str) -> type:
    """The plugin class registered as ``name``, or loaded from a ``module:Class`` string."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise HarnessError(f"cannot load {kind} '{name}': {e}") from None
    else:
        ep = _entry_point(kind, name)
        if ep is None:
            valid = ", ".join(names(kind)) or "(none installed)"
            raise HarnessError(f"unknown {kind} '{name}'; valid {kind}s: {valid} (or module:Class)")
        try:
            cls = ep.load()
        except Exception as e:  # a broken plugin must not read as an unknown name
            raise HarnessError(f"{kind} plugin '{name}' ({ep.value}) failed to load: {type(e).__name__}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, _BASES[kind])):
        raise HarnessError(f"{kind} '{name}' is not a harness.api.{_BASES[kind].__name__} subclass")
    return cls


def provenance(kind: str, name: str) -> dict:
    """Where a plugin comes from: its name, ``module:Class``, and the distribution (package) that
    registered it with that package's version (None for an unpackaged ``module:Class`` plugin)."""
    cls = load(kind, name)
    out = {"name": name, "class": f"{cls.__module__}:{cls.__qualname__}", "distribution": None, "version": None}
    ep = None if ":" in name else _entry_point(kind, name)
    dist = getattr(ep, "dist", None)
    if dist is not None:
        out.update(distribution=dist.metadata["Name"], version=dist.version)
    return out


def describe(kind: str) -> list[tuple[str, str]]:
    """(name, one-line description) for every registered plugin; load failures are reported inline."""
    out = []
    for n in names(kind):
        try:
            out.append((n, load(kind, n).description))
        except HarnessError as e:
            out.append((n, f"[unavailable: {e}]"))
    return out
