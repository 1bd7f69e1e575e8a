"""Command line: ``python -m harness {run,list,leaderboard,zoo,sweep,bench,check-checkpoints,...}``.

Every user error is one line on stderr and exit code 2; nothing already recorded is touched.
"""
from __future__ import annotations

import os
import sys

from harness.api import HarnessError
from harness.cli_parser import build_parser

__all__ = ["COMMANDS", "build_parser", "main"]


def cmd_finetune(args) -> int:
    """Fine-tune the image tower on each data set's train split (heads frozen) and save
    ``<out>/<data set>.safetensors`` with the fine-tuned image-tower weights."""
    from pathlib import Path
    from harness.checkpoints import save_state_dict
    from harness.config import coerce
    from harness.finetune import finetune
    from harness.sources.open_clip import from_checkpoints
    if bool(args.datasets) == bool(args.suite):
        raise HarnessError("finetune needs --datasets A,B or --suite NAME (one of them)")
    if args.suite:
        from harness.data.suites import suite
        datasets = suite(args.suite)
        if not args.data_root:
            raise HarnessError(f"--suite {args.suite} needs --data-root (where its data sets are)")
    else:
        datasets = coerce(args.datasets, list[str], "--datasets")
    if not args.model and not args.pretrained.startswith("local-dir:"):
        raise HarnessError("finetune needs --model (an open_clip architecture) or --pretrained local-dir:DIR")
    if args.data_root and not os.path.isdir(args.data_root):
        raise HarnessError(f"data root not found: {args.data_root}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise HarnessError(f"--out {out} exists and is not a folder")
    source = from_checkpoints(args.model, args.pretrained or None, None, datasets, args.data_root,
                              seed=args.seed, max_n=args.max_n)
    out.mkdir(parents=True, exist_ok=True)
    model, metadata = source, None
    if args.mode == "linear":  # the tangent space at θ0: the same files, marked, for -t linearize=true
        from harness.sources.linear import LINEAR_METADATA, linearized
        model, metadata = linearized(source, references=False), dict(LINEAR_METADATA)
    for ds in datasets:
        tv = finetune(model, ds, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
        source.task_vectors[ds] = tv
        path = out / f"{ds}.safetensors"
        save_state_dict({f"visual.{k}": source.base[k] + v for k, v in tv.items()}, path, metadata=metadata)
        zs, ft = model.accuracy(source.base, ds, "test"), model.accuracy(source.finetuned(ds), ds, "test")
        print(f"{ds}: test accuracy {zs:.4f} -> {ft:.4f}{' (linearised)' if metadata else ''}; wrote {path}")
    print(f"use them with: -t checkpoints={out}" + (" -t linearize=true" if metadata else ""))
    return 0


def cmd_bench(args) -> int:
    import harness.bench as bench
    from harness.config import coerce
    seeds = coerce(args.seeds, list[int], "--seeds")
    results_dir = args.results_dir or f"results/bench-{args.suite}"
    if args.suite == "perf":
        import runpy
        script = bench.BENCHMARKS / "perf.py"
        if args.task_options:
            raise HarnessError("bench perf takes no task options (-t); it measures the default zoo's addition task")
        if not script.is_file():
            raise HarnessError(f"bench perf runs {script}, which is part of the project's source tree, not the package")
        perf = runpy.run_path(str(script))
        perf["main"](["--seeds", ",".join(map(str, seeds)), "--results-dir", results_dir]
                     + (["--only", args.only] if args.only else []))
        return 0
    if args.only:
        raise HarnessError(f"--only applies to bench perf, not bench {args.suite}")
    out = bench.main(args.suite, seeds, results_dir, args.cache_dir,
                     _pairs(args.task_options, "-t"))
    print(out)
    return 0


def _pairs(values, flag):
    from harness.config import parse_pairs
    return parse_pairs(values, flag) if values else None


def _run_config(args):
    """The run config of ``run``'s flags (and of ``check-checkpoints``, which takes its source flags)."""
    from harness.config import build_config
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "trust_checkpoints")}
    flags["searcher_options"] = _pairs(getattr(args, "searcher_options", None), "-s")
    flags["task_options"] = _pairs(args.task_options, "-t")
    if args.data_root is not None:
        flags["task_options"] = {**(flags["task_options"] or {}), "data_root": args.data_root}
    if getattr(args, "resume", None):
        flags = _with_recorded(flags)
    return build_config(flags)


def _with_recorded(flags: dict) -> dict:
    """``--resume RUN_ID``: the run's recorded settings, under the flags given on this command
    (execution flags such as --workers; any other that differs is refused by the runner)."""
    from harness.config import EXECUTION_FIELDS, RunConfig
    from harness.results import RunStore
    store = RunStore(flags.get("results_dir") or RunConfig().results_dir, flags["resume"])
    recorded = store.recorded_config()
    if recorded is None:
        return flags  # nothing recorded: the runner says so in one line
    merged = {k: v for k, v in recorded.items() if k not in EXECUTION_FIELDS}
    for plugin in ("searcher", "task"):  # another plugin named: the recorded one's options do not apply
        if flags.get(plugin) not in (None, recorded.get(plugin)):
            merged.pop(f"{plugin}_options", None)
    for k, v in flags.items():
        if v is None:
            continue
        merged[k] = {**merged.get(k, {}), **v} if k in ("searcher_options", "task_options") else v
    return merged


def cmd_run(args) -> int:
    import harness.sources.task_check as task_check
    from harness.runner import run
    cfg = _run_config(args)
    if hint := gradient_hint(cfg):
        print(hint, file=sys.stderr)
    with task_check.trusting(args.trust_checkpoints):
        record = run(cfg, log=lambda m: print(m, file=sys.stderr))
    print_run(record)
    return 0 if record.get("status") == "complete" else 1


def gradient_hint(cfg) -> str:
    """A note for the gradient searcher at the paper's learning rate on a built-in zoo: the paper's
    lr (1e-3) was tuned for CLIP ViTs, and on the small zoos ``--preset atlas`` (lr 1e-2) learns
    far more within the same budget. The default stays the paper's, so a run named after the
    paper's method runs the paper's settings."""
    opts = cfg.task_options or {}
    if cfg.searcher != "gradient" or "lr" in (cfg.searcher_options or {}) or opts.get("checkpoints") \
            or cfg.task == "quadratic":
        return ""
    return ("note: the gradient searcher uses the paper's lr 1e-3 (tuned for CLIP ViTs); on the built-in "
            "zoos --preset atlas (lr 1e-2) reaches a higher accuracy in the same budget")


def print_run(record: dict) -> None:
    """The references (zero-shot, task arithmetic, ...) and this run, side by side."""
    import pandas as pd
    rows = dict(record.get("references") or {})
    rows[f"this run ({record['searcher']})"] = record.get("final", {})
    df = pd.DataFrame.from_dict(rows, orient="index")
    with pd.option_context("display.float_format", "{:.4f}".format, "display.width", 160, "display.max_columns", 30):
        print(df.to_string())
    info = record.get("searcher_info") or {}
    extra = f"; {', '.join(f'{k}={v}' for k, v in info.items())}" if info else ""
    print(f"\nrun {record['run_id']}: {record['evaluations']} evaluations in {record['wall_time_s']:.1f} s; "
          f"{record['headline']} = {record['final'].get(record['headline'], float('nan')):.4f}{extra}")
    if record.get("constraint_ok") is False:
        print("note: this run breaks the task's constraint and is not ranked")
    print(f"recorded in {os.path.dirname(record['coefficients'] or '')}")


def cmd_presets(args) -> int:
    """One line per preset, or one preset in full (``presets NAME``)."""
    from harness.presets import PRESETS, get
    if args.name:
        p = get(args.name)
        print(f"{args.name}: {p.method} ({p.paper})")
        print(f"  runs: python -m harness run {p.flags()}")
        if p.note:
            print(f"  note: {p.note}")
        print("  flags given beside --preset override it")
        return 0
    width = max(map(len, PRESETS))
    for name, p in PRESETS.items():
        print(f"{name:{width}s}  {p.method} ({p.paper})")
    print("\npython -m harness presets NAME shows one in full; run --preset NAME runs it")
    return 0


def cmd_list(args) -> int:
    import harness.registry as registry
    if args.name:
        kinds = [k for k in registry.GROUPS if args.name in registry.names(k)]
        if not kinds:
            raise HarnessError(f"no installed plugin named '{args.name}'; `python -m harness list` shows them")
        for kind in kinds:
            cls = registry.load(kind, args.name)
            prov = registry.provenance(kind, args.name)
            print(f"{kind} {args.name} ({prov['distribution'] or prov['class']} {prov['version'] or ''}): {cls.description}")
            rows = registry.options_table(kind, args.name)
            if kind == "searcher":
                rows += [(n, t, d, h + " (wrapper)") for n, t, d, h in registry.options_table_of(_wrappers())
                         if n not in cls.option_fields()]
            for n, t, d, h in rows:
                print(f"  {n:16s} {t:12s} {d:14s} {h}")
            if not rows:
                print("  (no options)")
        return 0
    for kind in registry.GROUPS:
        print(f"{kind}s:")
        for name, desc in registry.describe(kind):
            print(f"  {name:18s} {desc}")
    return 0


def _wrappers():
    from harness.wrappers import Wrappers
    return Wrappers


def cmd_convert(args) -> int:
    from harness.config import coerce
    from harness.convert import convert_checkpoints
    pairs = []
    for entry in coerce(args.checkpoints, list[str], "--checkpoints"):
        name, sep, path = entry.partition("=")
        if not sep or not name:
            raise HarnessError(f"--checkpoints expects NAME=PATH entries, got {entry!r}")
        pairs.append((name.strip(), path.strip()))
    manifest = convert_checkpoints(args.pretrained, pairs, args.out, replace=args.replace)
    print(f"read {len(manifest['read'])} inputs ({manifest['format_read']}); wrote {args.out}/manifest.json")
    print(f"use them with: {manifest['use']}")
    return 0


def cmd_check_plugin(args) -> int:
    from harness.conformance import check_plugin
    kind, checks = check_plugin(args.name, args.kind, _pairs(args.searcher_options, "-s"),
                                _pairs(args.task_options, "-t"), args.cache_dir)
    for c in checks:
        print(f"{'PASS' if c.ok else 'FAIL'}  {kind} {args.name}: {c.name}" + (f" — {c.detail}" if c.detail else ""))
    failed = sum(not c.ok for c in checks)
    print(f"{len(checks) - failed}/{len(checks)} checks passed")
    return 1 if failed else 0


def cmd_leaderboard(args) -> int:
    from harness.leaderboards import leaderboard
    from harness.plots import show
    from harness.records import read_records
    records = read_records(args.results_dir)
    board = leaderboard(args.results_dir, task=args.task, searcher=args.searcher, family_prefix=args.family, records=records)
    if board.empty:
        raise HarnessError(f"no completed runs under {args.results_dir}/runs; run `python -m harness run` first")
    show(board, args.results_dir, plots=args.plots, records=records, task=args.task, searcher=args.searcher,
         family_prefix=args.family)
    return 0


def cmd_sweep(args) -> int:
    import harness.sources.task_check as task_check
    from harness.sweeps import load_sweep, run_sweep
    with task_check.trusting(args.trust_checkpoints):
        run_sweep(load_sweep(args), log=lambda m: print(m, file=sys.stderr), show=True)
    return 0


def cmd_check_checkpoints(args) -> int:
    """Build the task's model source as ``run`` would, print the checkpoint check's table
    (:mod:`harness.sources.task_check`) and exit 1 when a checkpoint fails it (a run would
    refuse), 0 otherwise (warnings included). A built-in zoo is checked on request too."""
    import harness.sources.task_check as task_check
    from harness.objective import check_finite, resolve_source, source_name
    from harness.problem import plan
    p = plan(_run_config(args))
    if not p.task_cls.composes or not hasattr(p.task_options, "source"):
        raise HarnessError(f"task '{p.config.task}' builds no model source: there are no checkpoints to check")
    cls, opts = resolve_source(p.task_options)
    source = cls.load(opts, cache_dir=p.config.cache_dir, progress=not p.config.quiet)
    check_finite(source, source_name(p.task_options))
    table = task_check.table_of(source)
    if table is None:
        if not task_check.checked_datasets(source):
            raise HarnessError(f"source '{cls.name}' has no fine-tuned checkpoint with a validation split to check")
        table = task_check.accuracy_table(source)
    verdicts = task_check.judge(table)
    print(task_check.format_table(table, verdicts))
    return 1 if any(v.status == "fail" for v in verdicts) else 0


def cmd_data(args) -> int:
    """``data suites`` lists the suites; ``data check`` reports a data root (exit 1 when a data set
    is missing, 2 when one is malformed)."""
    from harness.data import suites
    if args.action == "suites":
        for name, tasks in suites.SUITES.items():
            print(f"{name:<10} {len(tasks):>2}  {', '.join(tasks)}")
        return 0
    from harness.data.check import check, format_rows, names_for
    if not args.data_root or not os.path.isdir(args.data_root):
        raise HarnessError(f"data check needs --data-root, an existing folder (got {args.data_root!r})")
    rows = check(names_for(args.suite, args.datasets), args.data_root, convention=args.convention,
                 val_rule=args.val_rule, decode=args.decode, workers=args.workers)
    print(format_rows(rows))
    return 1 if any(r.status == "missing" for r in rows) else 0


def cmd_plot(args) -> int:
    from pathlib import Path
    from harness.plots import plot_coefficients
    from harness.results import RunStore
    store = RunStore(args.results_dir, args.run_id)
    rec = store.record()
    if not rec or not rec.get("coefficients"):
        raise HarnessError(f"no completed run '{args.run_id}' under {args.results_dir}/runs")
    out = plot_coefficients(rec, Path(args.results_dir) / "plots" / f"coefficients-{args.run_id}.png", run_dir=store.dir)
    print(out)
    return 0


def cmd_zoo(args) -> int:
    import harness.registry as registry
    from harness.sources import cache as zoo
    if args.action == "list":
        for name in registry.names("source"):
            if getattr(registry.load("source", name), "cached", False):
                print(name)
        return 0
    if args.action == "build":
        zoo.build_zoo(args.name, cache_dir=args.cache_dir, force=args.force)
    df = zoo.zoo_info(args.name, cache_dir=args.cache_dir)
    import pandas as pd
    with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 160):
        print(df.to_string())
    for k, v in df.attrs.items():
        print(f"{k}: {v}")
    return 0


COMMANDS = {"check-checkpoints": cmd_check_checkpoints, "check-plugin": cmd_check_plugin, "presets": cmd_presets, "convert": cmd_convert, "finetune": cmd_finetune, "run": cmd_run, "list": cmd_list, "leaderboard": cmd_leaderboard, "zoo": cmd_zoo, "bench": cmd_bench,
            "sweep": cmd_sweep, "plot": cmd_plot, "data": cmd_data}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return 2
        return COMMANDS[args.command](args)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
