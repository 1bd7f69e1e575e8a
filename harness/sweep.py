"""Sweeps: searchers × tasks × seeds through the normal runner.

A run already recorded as complete is skipped (``run`` reports it instead of repeating it), so an
interrupted sweep resumes where it stopped — an interrupted run itself resumes from its trace.

A sweep file (``--file sweep.toml``)::

    seeds = [0, 1]
    tasks = ["addition", "negation"]
    results_dir = "results"

    [task_options]            # applied to every task that has these options
    zoo = "effnet"

    [[searchers]]
    name = "nevergrad"
    budget = 300
    space = "per_block"
    options = { optimizer = "NGOpt" }

    [[searchers]]
    name = "gradient"
    budget = 200
    options = { lr = 0.01 }
    task_options = { transform = "ties" }   # this entry's own task options (over the shared ones)
"""
from __future__ import annotations

import tomllib
from pathlib import Path

from harness import registry
from harness.api import HarnessError
from harness.config import RunConfig, coerce, parse_pairs
from harness.leaderboard import leaderboard
from harness.problem import plan
from harness.results import RunInUse
from harness.runner import run

_TOP = {"seeds", "tasks", "searchers", "results_dir", "cache_dir", "task_options", "workers", "quiet"}
_SEARCHER = {"name", "label", "budget", "space", "options", "batch_size", "task_options"}


def read_sweep_file(file: str) -> dict:
    """A sweep file's contents, checked (unknown keys are errors)."""
    path = Path(file)
    if not path.is_file():
        raise HarnessError(f"sweep file not found: {file}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise HarnessError(f"sweep file {file} is not valid TOML: {e}") from None
    unknown = sorted(set(data) - _TOP)
    if unknown:
        raise HarnessError(f"unknown key '{unknown[0]}' in {file}; valid: {', '.join(sorted(_TOP))}")
    for s in data.get("searchers", []):
        bad = sorted(set(s) - _SEARCHER)
        if bad or "name" not in s:
            raise HarnessError(f"each [[searchers]] entry needs 'name' and may have {', '.join(sorted(_SEARCHER - {'name'}))}; got {sorted(s)}")
    return data


def load_sweep(args) -> dict:
    """The sweep as a dict, from ``--file`` and/or flags (flags win)."""
    spec: dict = {"seeds": [0, 1], "tasks": [], "searchers": [], "results_dir": "results", "cache_dir": None,
                  "task_options": {}, "workers": 0, "quiet": False}
    if args.file:
        spec.update(read_sweep_file(args.file))
    if args.seeds:
        spec["seeds"] = coerce(args.seeds, list[int], "--seeds")
    if args.tasks:
        spec["tasks"] = coerce(args.tasks, list[str], "--tasks")
    if args.searchers:
        opts = parse_pairs(args.searcher_options, "-s")
        spec["searchers"] = [{"name": n, "budget": args.budget, "space": args.space, "options": dict(opts)}
                             for n in coerce(args.searchers, list[str], "--searchers")]
    spec["task_options"] = {**spec["task_options"], **parse_pairs(args.task_options, "-t")}
    for k in ("results_dir", "cache_dir"):
        if getattr(args, k, None):
            spec[k] = getattr(args, k)
    spec["workers"] = args.workers or spec["workers"]
    spec["quiet"] = args.quiet or spec["quiet"]
    if not spec["tasks"] or not spec["searchers"]:
        raise HarnessError("a sweep needs tasks and searchers (--tasks a,b --searchers x,y, or a --file)")
    return spec


def configs(spec: dict) -> list[RunConfig]:
    """Every run of the sweep, checked against the plugins before anything runs."""
    out = []
    for task in spec["tasks"]:
        fields = registry.load("task", task).option_fields()
        topts = {k: v for k, v in spec["task_options"].items() if k in fields}
        for s in spec["searchers"]:
            for seed in spec["seeds"]:
                where = f"sweep searcher {s['name']!r}"
                for key in ("options", "task_options"):
                    if not isinstance(s.get(key) or {}, dict):
                        raise HarnessError(f"{where}: {key} must be a table, e.g. {key} = {{ key = value }}")
                cfg = RunConfig(task=task, searcher=str(s["name"]), budget=coerce(s.get("budget"), int | None, f"{where} budget"),
                                space=coerce(s.get("space"), str | None, f"{where} space"),
                                batch_size=coerce(s.get("batch_size"), int | None, f"{where} batch_size"),
                                seed=coerce(seed, int, "sweep seed"), searcher_options=dict(s.get("options") or {}),
                                task_options={**topts, **(s.get("task_options") or {})}, results_dir=spec["results_dir"], cache_dir=spec["cache_dir"],
                                workers=spec["workers"], quiet=spec["quiet"])
                plan(cfg)  # fail on a typo before hours of runs, not after
                out.append(cfg)
    return out


def run_sweep(spec: dict, log=print):
    """Run every missing run of the sweep; return the leaderboard of the sweep's tasks."""
    cfgs = configs(spec)
    done = 0
    for i, cfg in enumerate(cfgs, 1):
        log(f"[sweep {i}/{len(cfgs)}] {cfg.task} × {cfg.searcher} seed {cfg.seed}")
        try:
            rec = run(cfg, log=log)
        except RunInUse as e:  # another sweep (or run) holds it: leave it to that process
            log(f"[sweep] skipped: {e}")
            continue
        done += rec.get("status") == "complete"
    log(f"[sweep] {done}/{len(cfgs)} runs complete")
    boards = [leaderboard(spec["results_dir"], task=t) for t in spec["tasks"]]
    import pandas as pd
    boards = [b for b in boards if not b.empty]
    return pd.concat(boards, ignore_index=True) if boards else pd.DataFrame()
