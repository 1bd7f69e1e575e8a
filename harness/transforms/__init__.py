"""Task-vector transforms: the data-free merging methods the field reports, as rewrites of the task
vectors before they are composed (``-t transform=NAME[:key=value,...]``).

A transform maps the T task vectors of a run to the vectors the run composes instead, such that
their *plain sum* is the method's merged task vector. Task arithmetic over the transformed vectors
(``α·1``, the baseline searcher of the same name) is then the classic method, and every other
searcher learns anisotropic coefficients over them (aTLAS over TIES vectors, AdaMerging++).

One module per method, each registered under ``harness.transforms`` in ``pyproject.toml``:

- ``ties`` (Yadav et al. 2023): trim, elect, disjoint merge (:mod:`.ties`).
- ``dare`` (Yu et al. 2024): drop each entry with probability ``p``, rescale by ``1/(1-p)`` (:mod:`.dare`).
- ``iso`` (Iso-C, Marczak et al. 2025): per matrix, the SVD of Σ τ_i with a flat spectrum (:mod:`.iso`).
- ``iso-cts`` (Iso-CTS, Marczak et al. 2025): Iso-C over the common and the task-specific subspaces (:mod:`.iso_cts`).
- ``tsvm`` (TSV-M, Gargiulo et al. 2025): each task's top singular vectors, decorrelated (:mod:`.tsvm`).
- ``consensus`` (TALL masks / consensus merging, Wang et al. 2024): keep the entries at least
  ``k`` tasks find important (:mod:`.consensus`).
- ``cart`` (CART, Choi et al. 2024): the average plus low-rank centred task vectors (:mod:`.cart`).
- ``wudi`` (WUDI, Cheng et al. 2025): per matrix, the merge that least disturbs each task's
  input subspace, by gradient descent on the task vectors alone (:mod:`.wudi`).

Transforms work on the CPU in fp32 when the task is prepared, once per run, before the engine
moves anything to the run's device. This module reads transform specs; :mod:`.common` holds the
pieces several methods share.
"""
from __future__ import annotations

import dataclasses

import harness.registry as registry
from harness.api import HarnessError, Transform
from harness.config import resolve_options

def parse(spec: str) -> tuple[str, dict[str, str]]:
    """``"ties:k=0.1,merge=sum"`` → ``("ties", {"k": "0.1", "merge": "sum"})``."""
    name, _, rest = str(spec).strip().partition(":")
    given = {}
    for pair in [p for p in rest.split(",") if p.strip()]:
        k, sep, v = pair.partition("=")
        if not sep or not k.strip():
            raise HarnessError(f"bad transform option {pair!r} in {spec!r}: expected NAME:key=value,key=value")
        given[k.strip()] = v.strip()
    if not name.strip():
        raise HarnessError(f"transform {spec!r} has no name; valid: {', '.join(registry.names('transform'))}")
    return name.strip(), given


def resolve(spec: str):
    """``(transform class, its typed, validated Options)`` for a spec; raises HarnessError."""
    name, given = parse(spec)
    cls = registry.load("transform", name)
    opts = resolve_options(cls, given, f"transform '{name}'")
    registry.validate("transform", cls, opts)
    return cls, opts


def canonical(spec: str) -> str:
    """The spec as it is recorded: the name, then the options that differ from their defaults,
    sorted (``ties:merge=sum``), so equal transforms written differently are one run identity."""
    if not spec:
        return ""
    name, _ = parse(spec)
    cls, opts = resolve(spec)
    default = cls.Options()
    changed = [f"{f.name}={_text(getattr(opts, f.name))}" for f in dataclasses.fields(opts)
               if getattr(opts, f.name) != getattr(default, f.name)]
    return name + (":" + ",".join(sorted(changed)) if changed else "")


def _text(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def load(spec: str) -> Transform:
    cls, opts = resolve(spec)
    return cls(opts)

