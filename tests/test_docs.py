"""The front door: the README's size, the docs site (built strictly), the reference pages
generated from the code, help text on every flag and option, and no history in the sources."""
import argparse
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import registry

ROOT = Path(__file__).resolve().parents[1]
GEN = runpy.run_path(str(ROOT / "scripts" / "gen_docs.py"))
PAGES = runpy.run_path(str(ROOT / "scripts" / "results_pages.py"))


def test_readme_is_a_short_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "arxiv.org/abs/2407.02880" in text and "@inproceedings" in text and "LICENSE" in text
    assert (ROOT / "LICENSE").is_file()
    for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):  # every relative link resolves
        if not link.startswith("http"):
            assert (ROOT / link).exists(), link


# History words: a session, an issue number, files that are not in the repository.
HISTORY = re.compile(r"\bsession \d|\bissue ?#\d|\(#\d+\)|#\d+'s\b|DESIGN\.md|(?-i:BENCHMARK-DATA)|/work/shared|"
                     r"prototypes/|\bthis week\b", re.I)


def _sources():
    for folder in ("harness", "searchers", "tasks", "scripts", "benchmarks", "docs", "tests", "examples"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".md", ".toml") and "build" not in path.parts and path.name != "test_docs.py":
                yield path
    yield ROOT / "README.md"


def test_no_history_in_code_or_docs():
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()[:90]}" for p in _sources()
            for i, line in enumerate(p.read_text().splitlines(), 1) if HISTORY.search(line)]
    assert not hits, "\n".join(hits)


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def test_every_cli_argument_has_help():
    from harness.cli import build_parser
    missing = [f"{name} {a.option_strings or a.dest}" for name, sub in _subparsers(build_parser())
               for a in sub._actions if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert not missing, missing


def test_every_builtin_plugin_option_declares_its_help():
    from harness.wrappers import Wrappers
    plugins = [(k, n, c) for k, n, c in GEN["builtin_plugins"]()] + [("wrapper", "wrappers", Wrappers)]
    assert len(plugins) >= 20
    missing = [f"{kind} {name}: {opt}" for kind, name, cls in plugins
               for opt, _t, _d, help_text in registry.options_table_of(cls) if not help_text.strip()]
    assert not missing, missing
    # The help is declared on the field (harness.api.option), not scraped from a docstring.
    import dataclasses
    for kind, name, cls in plugins:
        for f in dataclasses.fields(cls.Options):
            assert f.metadata.get("help"), f"{kind} {name}: {f.name}"


def test_declared_bounds_and_choices_are_enforced_with_one_line(capsys):
    from harness.cli import main
    assert main(["run", "--task", "quadratic", "--searcher", "gradient", "-s", "lr=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: searcher option lr must be > 0, got -1.0", err


def test_reference_pages_are_generated_from_the_code():
    assert GEN["main"](["--check"]) == 0, "run python scripts/gen_docs.py"
    cli = (ROOT / "docs" / "reference" / "cli.md").read_text()
    for command in ("run", "sweep", "leaderboard", "list", "presets", "convert", "finetune", "data", "check-plugin"):
        assert f"## `{command}`" in cli
    options = (ROOT / "docs" / "reference" / "options.md").read_text()
    assert "### `gradient`" in options and "learning rate" in options.lower()


def test_presets_prints_a_readable_list_and_one_preset_in_full(capsys):
    from harness.cli import main
    from harness.presets import PRESETS
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(map(len, lines)) <= 120 and sum(line.split(" ")[0] in PRESETS for line in lines) == len(PRESETS)
    assert main(["presets", "atlas"]) == 0
    out = capsys.readouterr().out
    assert "--searcher gradient --space per_block --budget 300 -s lr=0.01" in out
    assert main(["presets", "nope"]) == 2


def test_results_page_is_generated_from_recorded_runs(tmp_path):
    from harness.sweeps import read_sweep_file, run_sweep
    sweep = tmp_path / "tiny.toml"
    sweep.write_text(f'# Two searchers on the quadratic bowl.\nseeds = [0, 1]\ntasks = ["quadratic"]\n'
                     f'results_dir = "{tmp_path / "results"}"\nquiet = true\n\n'
                     '[[searchers]]\nname = "random"\nlabel = "random search"\nbudget = 20\n\n'
                     '[[searchers]]\nname = "nevergrad"\nbudget = 20\n')
    spec = {"seeds": [0, 1], "cache_dir": None, "task_options": {}, "workers": 0, "device": "cpu",
            **read_sweep_file(str(sweep))}
    board = run_sweep(spec, log=lambda m: None)
    out = tmp_path / "pages"
    text = PAGES["page"](sweep, out).read_text()
    assert "Two searchers on the quadratic bowl." in text and "4 of 4" in text
    for row in board.itertuples():  # the page's figures are the records' figures
        assert re.search(rf"\| {re.escape(row.searcher)} \|.*\| {row.mean:.4f} ± {row.std:.4f} \|", text), row.searcher
    assert "page generated at commit" in text and (out / "tiny.png").stat().st_size > 1000
    # A run the file names but nobody recorded is listed, not invented.
    sweep.write_text(sweep.read_text().replace("seeds = [0, 1]", "seeds = [0, 1, 2]"))
    text = PAGES["page"](sweep, out).read_text()
    assert "4 of 6" in text and "## Not recorded yet" in text and "quadratic-random-" in text


def test_results_page_puts_transforms_side_by_side():
    """Runs over several transforms get a transform × method table and, per method, the best
    transform with its gain over the raw vectors."""
    import pandas as pd
    rows = [("task-arithmetic", "—", "per_task, 21 evals", 0.76, 0.01, 3), ("iso", "iso", "per_task, 21 evals", 0.90, 0.0, 3),
            ("gradient", "—", "per_block, 300 evals", 0.91, 0.003, 3), ("gradient", "iso", "per_block, 300 evals", 0.92, 0.002, 3),
            ("zero-shot", "—", "per_task, 1 evals", 0.75, 0.0, 3), ("nevergrad", "iso", "per_block, 300 evals", 0.915, 0.0, 1)]
    board = pd.DataFrame([{"searcher": a, "transform": t, "setting": st, "mean": m, "std": sd, "n": n,
                           "wall_time_s": 10.0} for a, t, st, m, sd, n in rows])
    text = "\n".join(PAGES["by_transform"](board))
    assert "| transform | own baseline (α grid) | gradient per_block | nevergrad per_block |" in text
    assert "| raw | 0.7600 ± 0.0100 (10 s) | 0.9100 ± 0.0030 (10 s) | — |" in text
    assert "| iso | 0.9000 ± 0.0000 (10 s) | 0.9200 ± 0.0020 (10 s) | 0.9150 ± — (n=1) (10 s) |" in text
    assert "- own baseline (α grid): best over **iso**, 0.9000, +14.00 points over the raw vectors." in text
    assert "- gradient per_block: best over **iso**, 0.9200, +1.00 points over the raw vectors." in text
    assert PAGES["by_transform"](board[board["transform"] == "—"]) == []


def test_docs_site_builds_strictly(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    assert mkdocs, "mkdocs is installed by scripts/setup.sh (the docs extra)"
    proc = subprocess.run([mkdocs, "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").is_file()


@pytest.mark.parametrize("page", ["getting-started.md", "api.md", "writing-plugins.md", "models-and-data.md"])
def test_docs_pages_have_no_broken_relative_links(page):
    text = (ROOT / "docs" / page).read_text()
    for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not link.startswith("http"):
            assert (ROOT / "docs" / page).parent.joinpath(link).exists(), f"{page}: {link}"
