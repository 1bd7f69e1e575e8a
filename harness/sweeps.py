"""Sweeps: searchers × tasks × seeds through the normal runner.

A run already recorded as complete is skipped (``run`` reports it instead of repeating it), so an
interrupted sweep resumes where it stopped — an interrupted run itself resumes from its trace. A
run that another process is running (a second sweep started at the same time) is left to it.

A sweep file (``--file sweep.toml``)::

    seeds = [0, 1]
    tasks = ["addition", "negation"]
    results_dir = "results"

    [task_options]            # applied to every task that has these options
    zoo = "effnet"

    [[searchers]]
    name = "nevergrad"
    label = "NGOpt per_block"  # the name of this entry's rows in the sweep's leaderboard
    budget = 300
    space = "per_block"
    options = { optimizer = "NGOpt" }

    [[searchers]]
    name = "gradient"
    budget = 200
    options = { lr = 0.01 }
    task_options = { transform = "ties" }   # this entry's own task options (over the shared ones)

Every field is type-checked before any run starts; a wrong one is a one-line error naming the
field, the entry and the type expected. A shared task option (``[task_options]`` or ``-t``) that no
task of the sweep takes is an error naming the valid ones, as ``run`` refuses it.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

import harness.registry as registry
from harness.api import HarnessError
from harness.config import RunConfig, coerce, parse_pairs
from harness.leaderboards import leaderboard
from harness.problem import plan
from harness.records import _is_int, one_line, read_records
from harness.results import RunInUse
from harness.runner import run


def _text(v) -> bool:
    return isinstance(v, str) and v.strip() != ""


def _table(v) -> bool:
    return isinstance(v, dict)


# Each field of a sweep file: (check, what it must be).
_TOP = {
    "seeds": (lambda v: isinstance(v, list) and bool(v) and all(_is_int(s) and 0 <= s < 2**32 for s in v),
              "a non-empty list of integers in 0..4294967295, e.g. seeds = [0, 1]"),
    "tasks": (lambda v: isinstance(v, list) and bool(v) and all(_text(t) for t in v),
              'a non-empty list of task names, e.g. tasks = ["addition"]'),
    "searchers": (lambda v: isinstance(v, list) and bool(v) and all(_table(s) for s in v),
                  "one or more [[searchers]] tables"),
    "results_dir": (_text, "a folder name (non-empty text)"),
    "cache_dir": (_text, "a folder name (non-empty text)"),
    "task_options": (_table, "a table, e.g. [task_options] or task_options = { key = value }"),
    "workers": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "quiet": (lambda v: isinstance(v, bool), "true or false"),
    "device": (_text, "a torch device: cpu, cuda or cuda:N"),
}
_SEARCHER = {
    "name": (_text, "a searcher name (non-empty text)"),
    "label": (_text, "non-empty text (the entry's name in the leaderboard)"),
    "budget": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "space": (_text, "a coefficient space (non-empty text), e.g. per_block"),
    "options": (_table, "a table, e.g. options = { key = value }"),
    "batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "task_options": (_table, "a table, e.g. task_options = { key = value }"),
}


def check_sweep(data: dict, where: str) -> dict:
    """``data`` (a parsed sweep file) if every field has its type; otherwise a one-line
    HarnessError naming the field, the entry and what it must be. Unknown keys are errors."""
    for key, value in data.items():
        if key not in _TOP:
            raise HarnessError(f"unknown key '{key}' in {where}; valid: {', '.join(sorted(_TOP))}")
        ok, expected = _TOP[key]
        if not ok(value):
            raise HarnessError(f"{where}: {key} must be {expected}, got {one_line(value)}")
    for n, entry in enumerate(data.get("searchers", []), 1):
        name = entry.get("name")
        at = f"{where}: [[searchers]] entry {n}" + (f" ({name!r})" if _text(name) else "")
        if "name" not in entry:
            raise HarnessError(f"{at} has no name; each [[searchers]] entry needs 'name' "
                               f"and may have {', '.join(sorted(set(_SEARCHER) - {'name'}))}")
        for key, value in entry.items():
            if key not in _SEARCHER:
                raise HarnessError(f"{at}: unknown key '{key}'; valid: {', '.join(sorted(_SEARCHER))}")
            ok, expected = _SEARCHER[key]
            if not ok(value):
                raise HarnessError(f"{at}: {key} must be {expected}, got {one_line(value)}")
    return data


def read_sweep_file(file: str) -> dict:
    """A sweep file's contents, checked (:func:`check_sweep`)."""
    path = Path(file)
    if not path.is_file():
        raise HarnessError(f"sweep file not found: {file}")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise HarnessError(f"sweep file {file} is not valid TOML: {' '.join(str(e).split())}") from None
    except OSError as e:
        raise HarnessError(f"cannot read sweep file {file}: {e.strerror or e}") from None
    return check_sweep(data, f"sweep file {file}")


def load_sweep(args) -> dict:
    """The sweep as a dict, from ``--file`` and/or flags (flags win). ``option_sources`` names
    where each shared task option came from (for error messages)."""
    spec: dict = {"seeds": [0, 1], "tasks": [], "searchers": [], "results_dir": "results", "cache_dir": None,
                  "task_options": {}, "workers": 0, "quiet": False, "device": "cpu"}
    if args.file:
        spec.update(read_sweep_file(args.file))
    sources = {k: f"[task_options] of {args.file}" for k in spec["task_options"]}
    if args.seeds:
        spec["seeds"] = coerce(args.seeds, list[int], "--seeds")
    if args.tasks:
        spec["tasks"] = coerce(args.tasks, list[str], "--tasks")
    if args.searchers:
        opts = parse_pairs(args.searcher_options, "-s")
        spec["searchers"] = [{"name": n, "budget": args.budget, "space": args.space, "options": dict(opts)}
                             for n in coerce(args.searchers, list[str], "--searchers")]
    elif args.searcher_options or args.budget is not None or args.space:
        raise HarnessError("-s, --budget and --space apply to --searchers; in a sweep file, give them per "
                           "[[searchers]] entry (options, budget, space)")
    flag_opts = parse_pairs(args.task_options, "-t")
    sources.update({k: "-t" for k in flag_opts})
    spec["task_options"] = {**spec["task_options"], **flag_opts}
    spec["option_sources"] = sources
    for k in ("results_dir", "cache_dir"):
        if getattr(args, k, None):
            spec[k] = getattr(args, k)
    spec["workers"] = args.workers or spec["workers"]
    spec["quiet"] = args.quiet or spec["quiet"]
    spec["device"] = getattr(args, "device", None) or spec["device"]
    if not spec["tasks"] or not spec["searchers"]:
        raise HarnessError("a sweep needs tasks and searchers (--tasks a,b --searchers x,y, or a --file)")
    return spec


def plan_sweep(spec: dict) -> tuple[list[RunConfig], dict[str, str]]:
    """Every run of the sweep, checked against the plugins before anything runs, and the
    ``label`` of each labelled entry by run key (the leaderboard's row name for its runs)."""
    fields = {task: registry.load("task", task).option_fields() for task in spec["tasks"]}
    taken = set().union(*fields.values())
    sources = spec.get("option_sources") or {}
    for k in spec["task_options"]:
        if k not in taken:
            raise HarnessError(f"unknown task option '{k}' in {sources.get(k, 'the sweep task_options')}: no task of "
                               f"this sweep ({', '.join(spec['tasks'])}) takes it; valid: {', '.join(sorted(taken))}")
    twice = sorted({t for t in spec["tasks"] if spec["tasks"].count(t) > 1})
    if twice:
        raise HarnessError(f"sweep tasks list {twice[0]!r} twice; list each task once")
    out, labels, seen = [], {}, {}
    for task in spec["tasks"]:
        topts = {k: v for k, v in spec["task_options"].items() if k in fields[task]}
        for n, s in enumerate(spec["searchers"], 1):
            where = f"sweep [[searchers]] entry {n} ({s['name']!r}), task {task}"
            for key in ("options", "task_options"):
                if not isinstance(s.get(key) or {}, dict):
                    raise HarnessError(f"{where}: {key} must be a table, e.g. {key} = {{ key = value }}")
            for seed in spec["seeds"]:
                try:
                    cfg = RunConfig(task=task, searcher=str(s["name"]),
                                    budget=coerce(s.get("budget"), int | None, "budget"),
                                    space=coerce(s.get("space"), str | None, "space"),
                                    batch_size=coerce(s.get("batch_size"), int | None, "batch_size"),
                                    seed=coerce(seed, int, "seed"), searcher_options=dict(s.get("options") or {}),
                                    task_options={**topts, **(s.get("task_options") or {})},
                                    results_dir=spec["results_dir"], cache_dir=spec["cache_dir"],
                                    workers=spec["workers"], quiet=spec["quiet"], device=spec.get("device") or "cpu")
                    planned = plan(cfg).config  # fail on a typo before hours of runs, not after
                    key = planned.key()
                except HarnessError as e:
                    raise HarnessError(f"{where}: {e}") from None
                if (first := seen.setdefault(planned.run_id(), where)) != where:  # one run, two rows
                    raise HarnessError(f"{where} is the same run as {first.split(', task')[0]} (identical settings, "
                                       "seed " f"{seed}); give it other settings or drop it")
                if s.get("label"):
                    labels.setdefault(key, s["label"])
                out.append(cfg)
    return out, labels


def configs(spec: dict) -> list[RunConfig]:
    """Every run of the sweep, checked against the plugins before anything runs."""
    return plan_sweep(spec)[0]


def run_sweep(spec: dict, log=print, show: bool = False):
    """Run every missing run of the sweep; return the leaderboard of the sweep's tasks (labelled
    entries under their label). With ``show``, also print it and write its files and curves
    (:func:`harness.plots.show`), from the same reading of the records."""
    import pandas as pd
    cfgs, labels = plan_sweep(spec)
    done = skipped = 0
    for i, cfg in enumerate(cfgs, 1):
        log(f"[sweep {i}/{len(cfgs)}] {cfg.task} × {cfg.searcher} seed {cfg.seed}")
        try:
            rec = run(cfg, log=log)
        except RunInUse as e:  # another sweep (or run) holds it: leave it to that process
            log(f"[sweep] skipped: {e}")
            skipped += 1
            continue
        done += rec.get("status") == "complete"
    log(f"[sweep] {done}/{len(cfgs)} runs complete" + (f", {skipped} left to the process running them" if skipped else ""))
    records = [(d, rec) for d, rec in read_records(spec["results_dir"]) if rec["task"] in spec["tasks"]]
    boards = [leaderboard(spec["results_dir"], task=t, records=records, labels=labels) for t in spec["tasks"]]
    boards = [b for b in boards if not b.empty]
    board = pd.concat(boards, ignore_index=True) if boards else leaderboard(spec["results_dir"], records=[])
    if show:
        from harness.plots import show as show_board
        show_board(board, spec["results_dir"], records=records, labels=labels)
    return board
