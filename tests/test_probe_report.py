"""Probe of the leaderboard, plots, sweeps and records, with malformed inputs made by
construction: every field of a real run record (recursively) and of a sweep file, replaced by each
wrong kind of value. A bad record is one warning line naming it and the good runs stay ranked; a
bad sweep file is one error line naming the field, exit code 2, and no run started."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import cli
from harness.config import RunConfig
from harness.records import read_records
from harness.runner import run
from tests.permissions import honour_permissions

ROOT = Path(__file__).resolve().parents[1]
ESCAPE = "x/../../../escape"  # from RESULTS/plots/curves-<task>.png this would land next to RESULTS


def _quiet(_):
    pass


def _run(res, searcher="random", seed=0, **opts):
    return run(RunConfig(task="quadratic", searcher=searcher, budget=12, seed=seed, results_dir=str(res), quiet=True,
                         task_options={"dim": 3}, searcher_options=opts), log=_quiet)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A results folder with three real runs: random seeds 0 and 1, nevergrad seed 0. The probe
    damages the random seed-1 record (``BAD``); the other two must always stay ranked."""
    res = tmp_path_factory.mktemp("probe") / "results"
    _run(res, "random", 0)
    _run(res, "nevergrad", 0)
    bad = _run(res, "random", 1)
    return res, bad["run_id"]


def _leaderboard(capsys, res, *extra):
    """``leaderboard`` in-process: (exit code, stdout, stderr lines other than ``wrote ...``)."""
    capsys.readouterr()
    code = cli.main(["leaderboard", "--results-dir", str(res), *extra])
    out, err = capsys.readouterr()
    return code, out, [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("wrote ")]


def _counts(res) -> dict[str, int]:
    """Runs per searcher in the leaderboard.csv the command wrote."""
    import pandas as pd
    board = pd.read_csv(res / "leaderboard.csv")
    return board.groupby("searcher")["n"].sum().to_dict()


def _case(tmp_path, base) -> tuple[Path, Path]:
    src, bad = base
    res = tmp_path / "r"
    shutil.copytree(src, res, ignore=shutil.ignore_patterns("leaderboard*", "plots"))
    return res, res / "runs" / bad / "record.json"


# --- every field of a record, every wrong kind -------------------------------------------------------

def _paths(obj, prefix=()):
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    for k, v in items:
        yield prefix + (k,)
        if isinstance(v, (dict, list)) and v:
            yield from _paths(v, prefix + (k,))


def _record(base) -> dict:
    src, bad = base
    return json.loads((src / "runs" / bad / "record.json").read_text())


def _wrong(v):
    """A value of another JSON kind than ``v``."""
    if isinstance(v, bool):
        return "yes"
    if isinstance(v, (int, float)):
        return "7"
    if isinstance(v, str):
        return 7
    if isinstance(v, dict):
        return ["x"]
    if isinstance(v, list):
        return {"x": 1}
    return 7  # null


KINDS = {"missing": None, "null": lambda v: None, "wrong type": _wrong, "nan": lambda v: math.nan,
         "inf": lambda v: -math.inf, "../ text": lambda v: ESCAPE}

# Fields the leaderboard and the curves read, with what they accept: a required text field takes
# any text ("../" included: it is never a path); optional ones may be missing or null.
TEXT, OTHER = "text", "other"
READ = {("status",): "status", ("run_id",): TEXT, ("task",): TEXT, ("searcher",): TEXT, ("key",): TEXT,
        ("seed",): OTHER, ("config",): OTHER, ("config", "space"): TEXT, ("config", "budget"): OTHER,
        ("headline",): "headline", ("higher_is_better",): OTHER, ("final",): OTHER, ("final", "distance"): OTHER,
        ("evaluations",): OTHER, ("wall_time_s",): OTHER}
OPTIONAL = {("constraint_ok",), ("peak_rss_mb",), ("config", "batch_size"), ("config", "searcher_options"),
            ("config", "task_options"), ("data_touched",), ("family",)}
# Fields a quadratic record leaves out, probed by adding them (missing = the record as it is).
ADDED = {("config", "task_options", "transform"): "ties", ("config", "task_options", "target"): "mnist",
         ("family",): {"pretrained": "a" * 16, "task_vectors": "b" * 16}}


PLOTTED = {("run_id",), ("task",), ("searcher",), ("key",), ("config", "space"), ("config", "task_options", "target"),
           ("config", "task_options", "transform"), ("config", "searcher_options", "sigma"), ("family", "pretrained")}


def _must_warn(path, kind) -> bool:
    if kind == "missing" and path in ADDED:
        return False
    if path in OPTIONAL or path in ADDED:
        if kind in ("missing", "null"):
            return False
        return not (kind == "../ text" and path in {("data_touched",), *[p for p in ADDED if p[0] == "config"]})
    role = READ.get(path)
    if role is None:
        return False
    return not (role == TEXT and kind == "../ text")


def _set(rec, path, kind):
    *parents, last = path
    node = rec
    for p in parents:
        if not isinstance(node.get(p) if isinstance(node, dict) else node[p], (dict, list)):
            node[p] = {}
        node = node[p]
    if path in ADDED and last not in node:
        node[last] = ADDED[path]
    if kind == "missing":
        node.pop(last)
    else:
        node[last] = KINDS[kind](node[last])


def _top_fields():
    """The top-level fields of a run record (and what a quadratic run adds); each test takes one
    and probes it and every field under it, as the real record has them."""
    import dataclasses
    from harness.results import RunRecord
    return [f.name for f in dataclasses.fields(RunRecord) if f.name != "extra"] + ["setup_s"]


@pytest.mark.parametrize("top", _top_fields())
def test_every_field_of_a_record_every_wrong_kind(tmp_path, base, capsys, top):
    rec0 = _record(base)
    assert top in rec0
    own = list(_paths(rec0))
    paths = [p for p in own if p[0] == top] + [p for p in ADDED if p[0] == top and p not in own]
    for n, path in enumerate(paths):
        for kind in KINDS:
            rec = json.loads(json.dumps(rec0))
            _set(rec, path, kind)
            what = f"{'.'.join(map(str, path))} = {kind}"
            case = tmp_path / f"{n}-{kind.replace(' ', '_').replace('/', '')}"
            case.mkdir()
            res, record = _case(case, base)
            record.write_text(json.dumps(rec))  # NaN and Infinity as Python's json writes them
            plots = kind == "../ text" and path in PLOTTED  # the curves (file names, labels) read these
            code, out, warns = _leaderboard(capsys, res, *(() if plots else ("--no-plots",)))
            assert code == 0, what
            assert len(warns) <= 1, (what, warns)
            counts = _counts(res)
            assert counts.get("nevergrad") == 1 and counts.get("random", 0) >= 1, (what, counts)  # the good runs
            if warns:
                assert warns[0].startswith(f"warning: skipped unreadable run record {record}: "), (what, warns)
                assert sum(counts.values()) == 2, (what, counts)
            else:
                assert sum(counts.values()) == 3, (what, counts)
            assert bool(warns) == _must_warn(path, kind), (what, warns)
            assert sorted(p.name for p in case.iterdir()) == ["r"], what  # nothing written outside the results
            assert record.read_text() == json.dumps(rec), what  # the record is left as it was
            shutil.rmtree(case)


# --- unreadable files and stray folders ----------------------------------------------------------------

def _deep():
    return "[" * 100_000 + "]" * 100_000


DAMAGE = {
    "empty file": lambda p: p.write_text(""),
    "blank file": lambda p: p.write_text("  \n"),
    "truncated JSON": lambda p: p.write_text(p.read_text()[:200]),
    "not an object": lambda p: p.write_text("[1, 2]"),
    "a number": lambda p: p.write_text("5"),
    "nested too deep": lambda p: p.write_text(_deep()),
    "not UTF-8": lambda p: p.write_bytes(b'{"run_id": "\xff\xfe"}'),
    "a folder": lambda p: (p.unlink(), p.mkdir()),
    "a dangling link": lambda p: (p.unlink(), p.symlink_to(p.parent / "nowhere.json")),
    "status unknown": lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "status": "done"})),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_an_unreadable_record_is_one_warning(tmp_path, base, capsys, damage):
    res, record = _case(tmp_path, base)
    DAMAGE[damage](record)
    code, out, warns = _leaderboard(capsys, res, "--no-plots")
    assert code == 0 and len(warns) == 1, warns
    assert warns[0].startswith(f"warning: skipped unreadable run record {record}: "), warns
    assert _counts(res) == {"nevergrad": 1, "random": 1}


def test_stray_folders_and_files_under_runs_are_passed_over(tmp_path, base, capsys):
    res, record = _case(tmp_path, base)
    runs = res / "runs"
    (runs / ".ipynb_checkpoints").mkdir()
    shutil.copy(record, runs / ".ipynb_checkpoints" / "record.json")  # a notebook's copy: not a run
    (runs / "notes").mkdir()
    (runs / "README.txt").write_text("x")
    (runs / "starting-run").mkdir()
    (runs / "starting-run" / "trace.jsonl").write_text("")
    code, out, warns = _leaderboard(capsys, res)
    assert code == 0 and warns == []
    assert _counts(res) == {"nevergrad": 1, "random": 2}


def test_damaged_traces_draw_what_they_can(tmp_path, base, capsys):
    res, record = _case(tmp_path, base)
    trace = record.parent / "trace.jsonl"
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    rows[0]["i"], rows[1]["best"], rows[2]["t"] = "one", math.nan, None
    trace.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n[1]\n")
    other = next(p for p in (res / "runs").iterdir() if p.name.startswith("quadratic-nevergrad")) / "trace.jsonl"
    other.unlink()
    other.mkdir()  # a folder where the trace should be
    code, out, warns = _leaderboard(capsys, res)
    assert code == 0 and len(warns) == 1 and str(other) in warns[0], warns
    assert (res / "plots" / "curves-quadratic.png").read_bytes()[:4] == b"\x89PNG"


# --- plots: names, settings, families, targets, moved folders -------------------------------------------

def _variant(res, run_id, new_id, **changes):
    """A copy of run ``run_id`` as run ``new_id`` with record fields changed (``config.x.y`` nested)."""
    src, dst = res / "runs" / run_id, res / "runs" / new_id
    shutil.copytree(src, dst)
    rec = json.loads((dst / "record.json").read_text())
    for k, v in {**changes, "run_id": new_id}.items():
        *parents, last = k.split(".")
        node = rec
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    (dst / "record.json").write_text(json.dumps(rec))


def test_record_text_never_makes_a_path(tmp_path, base, capsys):
    res, record = _case(tmp_path, base)
    _variant(res, base[1], "evil-a", task=ESCAPE, key="k1")
    _variant(res, base[1], "evil-b", task="/etc/passwd", key="k2")
    _variant(res, base[1], "evil-c", task="..", key="k3")
    _variant(res, base[1], "evil-d", task="x/../../../escape!", key="k4")  # the same slug as evil-a
    code, out, warns = _leaderboard(capsys, res)
    assert code == 0 and warns == []
    pngs = sorted(p.name for p in (res / "plots").iterdir())
    assert len(pngs) == 5 and all(p.startswith("curves-") and "/" not in p and ".." not in p for p in pngs), pngs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]
    from harness.plots import safe_name
    assert safe_name("../../x") == "x" and safe_name("..") == "task" and safe_name("a/b", {"a_b"}).startswith("a_b-")


def test_curves_keep_settings_and_transforms_apart(tmp_path, capsys):
    from harness.plots import curves
    res = tmp_path / "r"
    for sigma in (0.05, 0.5):
        for seed in (0, 1):
            _run(res, "random", seed, sigma=sigma)
    frames = curves(res)
    (df,) = frames.values()
    assert df["curve"].nunique() == 2 and df["label"].nunique() == 2
    assert {lab for lab in df["label"].unique()} == {"random per_task, 12 evals, sigma=0.05",
                                                     "random per_task, 12 evals, sigma=0.5"}
    assert all(len(g.groupby("seed")) == 2 for _, g in df.groupby("curve"))
    # Same searcher and options, another transform: another curve, labelled with the transform.
    run_id = next(p.name for p in (res / "runs").iterdir())
    _variant(res, run_id, "ties-copy", **{"key": "tieskey", "config.task_options.transform": "ties"})
    (df,) = curves(res).values()
    assert df["curve"].nunique() == 3 and any(lab.startswith("random ties ") for lab in df["label"].unique())


def test_family_filters_the_curves_and_targets_label_the_task(tmp_path, base, capsys):
    from harness.leaderboards import leaderboard
    from harness.plots import curves
    res, record = _case(tmp_path, base)
    fam_a = {"pretrained": "a" * 16, "task_vectors": "b" * 16}
    fam_c = {"pretrained": "c" * 16, "task_vectors": "d" * 16}
    _variant(res, base[1], "neg-mnist", task="negation", key="n1", family=fam_a, **{"config.task_options.target": "mnist"})
    _variant(res, base[1], "neg-cv", task="negation", key="n2", family=fam_c, **{"config.task_options.target": "cvdigits"})
    board = leaderboard(res)
    assert {"negation:mnist", "negation:cvdigits", "quadratic"} <= set(board["task"])
    assert set(curves(res, family_prefix="aaaa")) == {"negation:mnist"}
    assert set(curves(res, task="negation")) == {"negation:mnist", "negation:cvdigits"}
    code, out, warns = _leaderboard(capsys, res, "--family", "aaaa")
    assert code == 0 and warns == [] and "negation:mnist" in out and "cvdigits" not in out
    assert sorted(p.name for p in (res / "plots").iterdir()) == ["curves-negation_mnist.png"]


def test_plot_after_the_results_folder_moved(tmp_path):
    old = tmp_path / "old"
    rec = _run(old, "random", 0)
    new = tmp_path / "moved" / "results"
    new.parent.mkdir()
    shutil.move(str(old), str(new))
    record = new / "runs" / rec["run_id"] / "record.json"
    assert str(old) in record.read_text()  # the record keeps the path it was written at
    r = subprocess.run([sys.executable, "-m", "harness", "plot", rec["run_id"], "--results-dir", str(new)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).read_bytes()[:4] == b"\x89PNG"
    data = json.loads(record.read_text())
    record.write_text(json.dumps({**data, "coefficients": "../../../etc/passwd"}))  # hand-edited: never read
    assert cli.main(["plot", rec["run_id"], "--results-dir", str(new)]) == 0
    (record.parent / "coefficients.safetensors").write_bytes(b"not safetensors")
    r = subprocess.run([sys.executable, "-m", "harness", "plot", rec["run_id"], "--results-dir", str(new)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith(
        f"error: cannot read the coefficients of run {rec['run_id']}"), r.stderr


def test_leaderboard_on_a_read_only_results_folder(tmp_path, base):
    res, _ = _case(tmp_path, base)
    before = {p: p.read_bytes() for p in res.rglob("*") if p.is_file()}
    for p in [*res.rglob("*"), res]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        try:
            r = subprocess.run([sys.executable, "-m", "harness", "leaderboard", "--results-dir", str(res)],
                               capture_output=True, text=True, cwd=ROOT, timeout=120, preexec_fn=honour_permissions)
        except subprocess.SubprocessError as e:
            pytest.skip(f"running as root and cannot drop CAP_DAC_OVERRIDE here ({e}): chmod does not restrict root")
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[0].split()[:3] == ["task", "rank", "searcher"]
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"warning: could not write the leaderboard files under {res} ("), lines
        assert "Permission denied" in lines[0] and "the table above is not saved" in lines[0]
        assert {p: p.read_bytes() for p in res.rglob("*") if p.is_file()} == before
    finally:
        for p in [res, *res.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)


def test_check_page_names_a_missing_or_failing_browser(tmp_path):
    page = tmp_path / "page.html"
    page.write_text("<html></html>")
    script = str(ROOT / "scripts" / "check_page.py")
    for browser, needle in (("no-such-browser", "browser 'no-such-browser' not found on PATH"),
                            ("false", "false wrote no screenshot of")):
        r = subprocess.run([sys.executable, script, str(page), "--browser", browser], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


# --- sweeps ----------------------------------------------------------------------------------------------

def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml(x)}" for k, x in v.items()) + "}"


def _sweep_file(path: Path, data: dict) -> Path:
    path.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in data.items()))
    return path


def _sweep(res) -> dict:
    return {"seeds": [0], "tasks": ["quadratic"], "results_dir": str(res), "workers": 0, "quiet": True,
            "task_options": {"dim": 3},
            "searchers": [{"name": "random", "label": "rand", "budget": 5, "space": "per_task", "batch_size": 1,
                           "options": {"sigma": 0.1}, "task_options": {"noise": 0.0}}]}


def _sweep_wrong(v):
    """Values of other TOML kinds than ``v`` (text is wrong only where text is not expected)."""
    out = [[True], math.nan] + ([] if isinstance(v, dict) else [{"x": 1}])
    if isinstance(v, str):
        return out + [7]
    return out + ["7" if not isinstance(v, bool) else "yes", ESCAPE] + ([] if isinstance(v, bool) else [True])


def _sweep_paths(data, prefix=()):
    items = data.items() if isinstance(data, dict) else enumerate(data)
    for k, v in items:
        if k == "results_dir":
            continue  # any text is a folder name: no wrong text kind to probe
        yield prefix + (k,)
        if isinstance(v, (dict, list)):
            yield from _sweep_paths(v, prefix + (k,))


OPTION_VALUES = {("task_options", "dim"), ("searchers", 0, "options", "sigma"), ("searchers", 0, "task_options", "noise")}


@pytest.mark.parametrize("path", list(_sweep_paths(_sweep("R"))), ids=lambda p: ".".join(map(str, p)))
def test_every_sweep_field_with_a_wrong_type(tmp_path, capsys, path):
    res = tmp_path / "res"
    for n, bad in enumerate(_sweep_wrong(_get(_sweep(res), path))):
        if path in OPTION_VALUES and isinstance(bad, str) and bad == "7":
            continue  # option values are parsed like -s/-t text, as in a run's TOML config
        data = _sweep(res)
        *parents, last = path
        node = data
        for p in parents:
            node = node[p]
        node[last] = bad
        f = _sweep_file(tmp_path / f"s{n}.toml", data)
        capsys.readouterr()
        code = cli.main(["sweep", "--file", str(f)])
        err = capsys.readouterr().err
        named = next(str(p) for p in reversed(path) if isinstance(p, str))
        assert code == 2, (path, bad, err)
        assert err.count("\n") == 1 and err.startswith("error: ") and named in err, (path, bad, err)
        assert not res.exists(), (path, bad)  # no run started


def _get(data, path):
    for p in path:
        data = data[p]
    return data


def test_a_sweep_refuses_an_unknown_task_option_like_run_does(tmp_path, capsys):
    res = tmp_path / "res"
    f = _sweep_file(tmp_path / "s.toml", {**_sweep(res), "task_options": {"dimm": 3}})
    assert cli.main(["sweep", "--file", str(f)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: unknown task option 'dimm' in [task_options] of {f}: no task of this sweep (quadratic) "
                   "takes it; valid: delay, dim, nan_above, noise\n")
    assert cli.main(["sweep", "--tasks", "quadratic", "--searchers", "random", "-t", "dimm=3",
                     "--results-dir", str(res)]) == 2
    assert capsys.readouterr().err == ("error: unknown task option 'dimm' in -t: no task of this sweep (quadratic) "
                                       "takes it; valid: delay, dim, nan_above, noise\n")
    data = _sweep(res)
    data["searchers"][0]["task_options"] = {"dimm": 3}
    f = _sweep_file(tmp_path / "e.toml", data)
    assert cli.main(["sweep", "--file", str(f)]) == 2
    assert capsys.readouterr().err == ("error: sweep [[searchers]] entry 1 ('random'), task quadratic: unknown task "
                                       "option 'dimm' for quadratic; valid: dim, noise, delay, nan_above\n")
    assert not res.exists()


def test_a_sweep_listing_one_run_twice_is_refused_before_anything_runs(tmp_path, capsys):
    """Two entries of identical settings (under two labels) were one run counted twice ("2/2 runs
    complete" for one run, one label silently lost); a task listed twice gave duplicate rows."""
    res = tmp_path / "res"
    data = _sweep(res)
    data["searchers"].append({**data["searchers"][0], "label": "other"})
    f = _sweep_file(tmp_path / "s.toml", data)
    assert cli.main(["sweep", "--file", str(f)]) == 2
    assert capsys.readouterr().err == ("error: sweep [[searchers]] entry 2 ('random'), task quadratic is the same run "
                                       "as sweep [[searchers]] entry 1 ('random') (identical settings, seed 0); give it "
                                       "other settings or drop it\n")
    data = {**_sweep(res), "tasks": ["quadratic", "quadratic"]}
    assert cli.main(["sweep", "--file", str(_sweep_file(tmp_path / "t.toml", data))]) == 2
    assert capsys.readouterr().err == "error: sweep tasks list 'quadratic' twice; list each task once\n"
    assert not res.exists()


def test_a_sweep_label_names_its_rows(tmp_path, capsys):
    res = tmp_path / "res"
    data = _sweep(res)
    data["seeds"] = [0, 1]
    data["searchers"].append({"name": "random", "budget": 5, "space": "per_task", "options": {"sigma": 0.4}})
    f = _sweep_file(tmp_path / "s.toml", data)
    capsys.readouterr()
    assert cli.main(["sweep", "--file", str(f)]) == 0
    out = capsys.readouterr().out
    rows = {ln.split()[2]: ln for ln in out.splitlines()[1:]}
    assert set(rows) == {"rand", "random"} and "sigma=0.1" in rows["rand"] and "sigma=0.4" in rows["random"]
    assert "| rand |" in (res / "leaderboard.md").read_text()


def test_a_sweep_whose_runs_are_all_held_elsewhere_ends_cleanly(tmp_path, capsys):
    from harness.problem import plan
    from harness.results import RunStore
    from harness.sweeps import plan_sweep
    res = tmp_path / "res"
    spec = {**_sweep(res), "cache_dir": None, "option_sources": {}}
    (cfg,), _ = plan_sweep(spec)
    store = RunStore(res, plan(cfg).config.run_id())
    store.lock()  # another process "is running" the sweep's only run
    try:
        f = _sweep_file(tmp_path / "s.toml", _sweep(res))
        assert cli.main(["sweep", "--file", str(f)]) == 0
    finally:
        store.close()
    out, err = capsys.readouterr()
    assert out.strip() == "(no completed runs)"
    assert "[sweep] skipped: run " in err and "0/1 runs complete, 1 left to the process running them" in err


def test_two_identical_sweeps_at_once(tmp_path):
    """The second sweep finds the run held by the first: it leaves it, and its leaderboard is the
    table (when the first has finished) or "(no completed runs)", never a traceback."""
    res = tmp_path / "res"
    args = [sys.executable, "-m", "harness", "sweep", "--tasks", "quadratic", "--searchers", "random",
            "--seeds", "0", "--budget", "40", "-t", "delay=0.05", "-t", "dim=3", "--results-dir", str(res), "--quiet"]
    procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "Traceback" not in err, err
        assert out.split()[:3] == ["task", "rank", "searcher"] or out.strip() == "(no completed runs)", out
    assert any("[sweep] skipped: run " in err or "already complete" in err for _, err in outs), outs
    (rec,) = [r for _, r in read_records(res)]
    assert rec["evaluations"] == 40
