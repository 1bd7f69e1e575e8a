"""The import graph of the project's Python packages, and the rules it must keep.

    python scripts/import_graph.py            # report; exit 1 if a rule is broken
    python scripts/import_graph.py --edges    # also print every module → module edge

Rules checked:
  1. ``harness`` never imports ``searchers``, ``tasks`` or ``benchmarks`` (plugins are reached
     through the entry-point registry, by name);
  2. no import cycle among the modules of ``harness`` (imports inside functions count: they
     are still a dependency, only a later one);
  3. each module imports only modules of its own layer or of the layers below (``LAYERS``, the
     table of docs/architecture.md);
  4. no module over 400 lines.
Reported, not yet enforced: the module sizes over the limit that remain.
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Folder → the name it installs under (pyproject.toml's package-dir).
PACKAGES = {"harness": "harness", "searchers": "atlas_harness_searchers", "tasks": "atlas_harness_tasks"}
# What the harness must never import: the plugins (under either name) and the benchmarks.
PLUGINS = ("atlas_harness_searchers", "atlas_harness_tasks", "searchers", "tasks", "benchmarks")
MAX_LINES = 400
DATA_MODULES: set[str] = set()  # modules exempt from the size limit: none
# The harness's layers, bottom up (a name covers the module and, for a folder, everything in it).
LAYERS = [
    ("contracts", ["harness.errors", "harness.options", "harness.outputs", "harness.api"]),
    ("configuration", ["harness.config", "harness.presets", "harness.registry"]),
    ("storage and files", ["harness.provenance", "harness.results", "harness.records", "harness.filecheck", "harness.checkpoints", "harness.unpickler", "harness.unpickle",
                           "harness.refcache"]),
    ("data", ["harness.data", "harness.stream"]),
    ("composition", ["harness.spaces", "harness.composition", "harness.lora"]),
    ("model sources", ["harness.sources", "harness.finetune", "harness.convert"]),
    ("transforms", ["harness.transforms"]),
    ("engines", ["harness.engines", "harness.evaluators"]),
    ("objectives", ["harness.compose_options", "harness.objective", "harness.selection"]),
    ("search", ["harness.wrappers"]),
    ("plan", ["harness.problem"]),
    ("evaluation", ["harness.ray_pool", "harness.ray_worker", "harness.ray_evaluator"]),
    ("loop", ["harness.loop", "harness.signals", "harness.runner"]),
    ("report", ["harness.leaderboards", "harness.plots", "harness.sweeps", "harness.bench"]),
    ("testing", ["harness.conformance"]),
    ("interfaces", ["harness.python_api", "harness.cli_parser", "harness.cli", "harness.__main__", "harness"]),
]


def layer(module: str) -> int | None:
    """The index in :data:`LAYERS` of the most specific entry that covers ``module``."""
    best = None
    for i, (_, names) in enumerate(LAYERS):
        for n in names:
            if module == n or module.startswith(n + "."):
                if best is None or len(n) > best[1]:
                    best = (i, len(n))
    return None if best is None else best[0]


def modules() -> dict[str, Path]:
    out = {}
    for folder, pkg in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [pkg] + list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports (absolute and relative, at any depth of the file)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            # `from pkg import mod` depends on pkg.mod; `from pkg import name` on pkg itself.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known and t.split(".")[0] in tuple(PACKAGES.values()) + PLUGINS:
                t = t.rpartition(".")[0] or t
                if t.count(".") == 0:
                    break
            if t and (t in known or t.split(".")[0] in PLUGINS) and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(g: dict[str, set[str]], prefix: str = "harness") -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), among ``prefix`` modules."""
    nodes = [n for n in g if n.split(".")[0] == prefix]
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index and w in g and w.split(".")[0] == prefix:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for n in nodes:
        if n not in index:
            visit(n)
    return out


def check() -> list[str]:
    """Every broken rule, one line each."""
    g, known = graph(), modules()
    problems = [f"{a} imports {b}" for a, deps in sorted(g.items()) if a.split(".")[0] == "harness"
                for b in sorted(deps) if b.split(".")[0] in PLUGINS]
    problems += [f"import cycle: {' ↔ '.join(c)}" for c in cycles(g)]
    for a, deps in sorted(g.items()):
        if a.split(".")[0] != "harness":
            continue
        la = layer(a)
        if la is None:
            problems.append(f"{a} is in no layer (add it to LAYERS)")
            continue
        for b in sorted(deps):
            lb = layer(b)
            if lb is not None and lb > la:
                problems.append(f"{a} ({LAYERS[la][0]}) imports {b} ({LAYERS[lb][0]}), a layer above it")
    for name, path in sorted(known.items()):
        n = len(path.read_text().splitlines())
        if n > MAX_LINES and name not in DATA_MODULES:
            problems.append(f"{path.relative_to(ROOT)} has {n} lines (limit {MAX_LINES})")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edges", action="store_true", help="print every module → module edge")
    args = ap.parse_args(argv)
    if args.edges:
        for a, deps in sorted(graph().items()):
            for b in sorted(deps):
                print(f"{a} -> {b}")
    problems = check()
    for p in problems:
        print(p)
    print(f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
