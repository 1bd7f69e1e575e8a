"""The Python API page (docs/api.md): every example runs, top to bottom, and its asserts hold."""
import os
import re
from pathlib import Path

import pytest

import harness

PAGE = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)


def test_the_page_has_examples_for_every_exported_function():
    code = "\n".join(_blocks())
    for name in ("run", "sweep", "leaderboard", "load_run", "compose", "task_vector"):
        assert f"harness.{name}(" in code, name
    assert set(harness.__all__) >= {"run", "sweep", "leaderboard", "load_run", "compose", "Run", "HarnessError"}


@pytest.mark.timeout(900)
def test_the_api_examples_run(tmp_path, cache_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ATLAS_HARNESS_CACHE", cache_dir)
    namespace: dict = {}
    for i, block in enumerate(_blocks(), 1):
        exec(compile(block, f"docs/api.md example {i}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "complete" in out and "searcher option lr must be > 0" in out
    # The runs landed where the CLI would put them, and the CLI ranks them too.
    assert len(list((tmp_path / "results" / "runs").iterdir())) >= 3
    assert os.path.isfile(namespace["run"].path / "record.json")


def test_no_submodule_shadows_an_api_function():
    """Importing ``harness.X`` sets the attribute ``harness.X`` to that module, so no module may be
    named after a function the package exports."""
    import importlib
    import pkgutil
    for mod in pkgutil.walk_packages(harness.__path__, "harness."):
        if not mod.name.endswith("__main__"):
            importlib.import_module(mod.name)
    for name in harness.__all__:
        assert not type(getattr(harness, name)).__name__ == "module", name
    assert harness.sweep.__module__ == harness.leaderboard.__module__ == "harness.python_api"
