"""Plugin options declared once: help text, choices and bounds on the dataclass field itself.

:func:`option` is re-exported by :mod:`harness.api` and :mod:`harness`; the registry runs
:func:`check_options` before a plugin's own ``validate``, and ``list NAME`` and the docs' option
tables print what :func:`constraint_text` says.
"""
from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

from harness.errors import HarnessError

_BOUNDS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
           "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices=None, ge=None, gt=None,
           le=None, lt=None, default_factory: Any = dataclasses.MISSING) -> Any:
    """Declare one plugin option: a dataclass field that carries its help text, its allowed
    values (``choices``) and its bounds (``ge``/``gt``/``le``/``lt``, as in pydantic).

    The declaration is the single source for ``python -m harness list NAME``, the docs' option
    tables and validation: :func:`check_options` refuses a value outside the choices or the
    bounds with a one-line :class:`HarnessError` before the plugin's own ``validate`` runs.
    ``None`` is always accepted for an option whose default is ``None`` ("not set")::

        @dataclass
        class Options:
            lr: float = option(1e-3, "learning rate of Adam", gt=0)
            space: str = option("per_block", "granularity", choices=["per_task", "per_block"])
    """
    meta: dict[str, Any] = {"help": " ".join(help.split())}
    if choices is not None:
        meta["choices"] = tuple(choices)
    for key, bound in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)):
        if bound is not None:
            meta[key] = bound
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def constraint_text(f: dataclasses.Field) -> str:
    """The choices and bounds an :func:`option` declares, as text (``'> 0, <= 1'``; ``'a | b'``)."""
    parts = [f"{_BOUNDS[k][0]} {f.metadata[k]}" for k in _BOUNDS if k in f.metadata]
    if "choices" in f.metadata:
        parts.insert(0, " | ".join(str(c) for c in f.metadata["choices"]))
    return ", ".join(parts)


def check_options(what: str, options) -> None:
    """Refuse option values outside what each field declares with :func:`option` (one line
    naming the option, the value and what is valid). ``what`` names the owner, e.g. ``"searcher"``."""
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if value is None or not f.metadata:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        choices = f.metadata.get("choices")
        for v in values:
            if choices is not None and v not in choices:
                raise HarnessError(f"{what} option {f.name}={v!r} is not one of {', '.join(map(str, choices))}")
            for key, (sym, ok) in _BOUNDS.items():
                if key in f.metadata and isinstance(v, (int, float)) and not isinstance(v, bool) \
                        and not ok(v, f.metadata[key]):
                    raise HarnessError(f"{what} option {f.name} must be {constraint_text(f)}, got {v!r}")
