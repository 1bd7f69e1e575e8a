"""The package layout keeps its rules (scripts/import_graph.py): the harness reaches plugins only
through the registry, its modules import each other without cycles, and modules stay small."""
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRAPH = runpy.run_path(str(ROOT / "scripts" / "import_graph.py"))


def test_the_layout_rules_hold():
    """No import from the harness into plugins or benchmarks, no cycle, no layer importing one
    above it, no module over 400 lines."""
    problems = GRAPH["check"]()
    assert not problems, problems


def test_the_graph_sees_imports_inside_functions(tmp_path):
    g = GRAPH["graph"]()
    assert "harness.registry" in g["harness.conformance"]
    assert "harness.runner" in g["harness.python_api"]  # imported inside run()
    assert not any(d.startswith(("tasks", "searchers")) for d in g["harness.conformance"])


def _problems(monkeypatch, *edges) -> str:
    broken = {k: set(v) for k, v in GRAPH["graph"]().items()}
    for a, b in edges:
        broken[a].add(b)
    monkeypatch.setitem(GRAPH["check"].__globals__, "graph", lambda: broken)
    return "\n".join(GRAPH["check"]())


def test_a_violation_of_each_rule_is_reported(monkeypatch):
    assert "harness.api (contracts) imports harness.runner (loop), a layer above it" in \
        _problems(monkeypatch, ("harness.api", "harness.runner"))
    assert "harness.config imports atlas_harness_tasks" in \
        _problems(monkeypatch, ("harness.config", "atlas_harness_tasks"))
    assert "import cycle: harness.config ↔ harness.registry" in \
        _problems(monkeypatch, ("harness.config", "harness.registry"), ("harness.registry", "harness.config"))
