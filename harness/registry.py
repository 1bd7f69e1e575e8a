"""Plugin discovery through Python entry points.

Built-in searchers and tasks are registered in ``pyproject.toml`` exactly as a third-party
package registers its own, so there is one door for both. ``module:Class`` strings load an
unpackaged plugin directly. Entry points are listed without being imported; a plugin is loaded
only when asked for, and a failure to load names the plugin.
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from harness.api import Engine, HarnessError, Searcher, Source, Task, Transform, check_options

GROUPS = {"searcher": "harness.searchers", "task": "harness.tasks", "source": "harness.sources",
          "engine": "harness.engines", "transform": "harness.transforms"}
_BASES = {"searcher": Searcher, "task": Task, "source": Source, "engine": Engine, "transform": Transform}


def names(kind: str) -> list[str]:
    """Sorted names of every registered plugin of ``kind`` (searcher, task, source, engine, transform)."""
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


def validate(kind: str, cls: type, options) -> None:
    """``cls.validate(options)``; whatever a plugin raises there becomes a one-line HarnessError
    naming the plugin (a plugin should raise HarnessError, but a ValueError must not give the
    user a traceback)."""
    check_options(kind, options)
    try:
        cls.validate(options)
    except HarnessError:
        raise
    except Exception as e:
        raise HarnessError(f"{kind} '{cls.name or cls.__name__}' rejected its options: {type(e).__name__}: {e}") from None


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


def options_table(kind: str, name: str) -> list[tuple[str, str, str, str]]:
    """``(option, type, default, help)`` for each option of a plugin, from the fields'
    :func:`harness.api.option` declarations (help text, then the choices and bounds)."""
    return options_table_of(load(kind, name))


def options_table_of(cls) -> list[tuple[str, str, str, str]]:
    """:func:`options_table` of a plugin class."""
    import dataclasses
    import typing

    from harness.api import constraint_text
    hints = typing.get_type_hints(cls.Options)
    rows = []
    for f in dataclasses.fields(cls.Options):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        tp = getattr(hints[f.name], "__name__", None) or str(hints[f.name]).replace("typing.", "")
        text = f.metadata.get("help", "")
        rule = constraint_text(f)
        if rule:
            text = f"{text} [{rule}]" if text else f"[{rule}]"
        rows.append((f.name, tp, repr(default), text))
    return rows


def describe(kind: str) -> list[tuple[str, str]]:
    """(name, one-line description) for every registered plugin; load failures are reported inline."""
    out = []
    for n in names(kind):
        try:
            out.append((n, load(kind, n).description))
        except HarnessError as e:
            out.append((n, f"[unavailable: {e}]"))
    return out
