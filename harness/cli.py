"""Command line: ``python -m harness {run,list,leaderboard,zoo,sweep,bench}``.

Every user error is one line on stderr and exit code 2; nothing already recorded is touched.
"""
from __future__ import annotations

import argparse
import os
import sys

from harness.api import HarnessError


CACHE_HELP = "zoo cache (default $ATLAS_HARNESS_CACHE, else $XDG_CACHE_HOME/atlas-harness or ~/.cache/atlas-harness)"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the usage block first)."""

    def error(self, message):
        raise HarnessError(f"{message} (see `{self.prog} --help`)")


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file with the same keys as these flags (flags override it)")
    p.add_argument("--preset", help="a published method's settings (python -m harness presets); flags override it")
    p.add_argument("--task", help="task plugin name or module:Class (default: addition)")
    p.add_argument("--searcher", help="searcher plugin name or module:Class (default: nevergrad)")
    p.add_argument("--budget", type=int, help="evaluations (gradient: steps); default: the searcher's")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="candidates asked per round; default: the searcher's")
    p.add_argument("--seed", type=int, help="seed of the search and of the task's data subsets (default 0)")
    p.add_argument("--space", help="per_task | per_layer | per_block | per_partition:K (default: the searcher's)")
    p.add_argument("-s", dest="searcher_options", action="append", metavar="KEY=VALUE", help="searcher option (repeatable)")
    p.add_argument("-t", dest="task_options", action="append", metavar="KEY=VALUE", help="task option (repeatable)")
    p.add_argument("--data-root", dest="data_root", metavar="DIR",
                   help="image folders DIR/<data set>/<split>/<class>/*.png for your own model "
                        "(same as -t data_root=DIR; see -t checkpoints)")
    p.add_argument("--workers", type=int, help="Ray workers (0 = evaluate in this process)")
    p.add_argument("--address", help="Ray cluster address to join (default: start a local one)")
    p.add_argument("--cpus-per-worker", dest="cpus_per_worker", type=float,
                   help="CPUs each Ray worker reserves, also its torch thread count (default 1)")
    p.add_argument("--gpus-per-worker", dest="gpus_per_worker", type=float,
                   help="GPUs (or a fraction) each Ray worker reserves; > 0 evaluates on cuda (default 0)")
    p.add_argument("--parallel", choices=None, help="auto | candidates | data | async (how Ray workers share the work; async pipelines: each score is told as it comes in and the worker takes the next candidate)")
    p.add_argument("--device", help="torch device for local evaluation (default cpu)")
    p.add_argument("--results-dir", dest="results_dir", help="where runs are recorded (default results/)")
    p.add_argument("--cache-dir", dest="cache_dir", help=CACHE_HELP)
    p.add_argument("--quiet", action="store_true", default=None, help="no progress bar")
    p.add_argument("--rerun", action="store_true", default=None, help="run again even if this run is already complete")
    p.add_argument("--resume", metavar="RUN_ID", help="resume this run id (the same command resumes by itself)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m harness", description="aTLAS harness: learn compositions of task vectors")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    run = sub.add_parser("run", help="run one search and record it")
    _add_run_flags(run)
    pr = sub.add_parser("presets", help="the named presets: published methods mapped onto tasks, searchers and options")
    pr.add_argument("name", nargs="?", help="show this preset in full (its flags and notes)")
    ls = sub.add_parser("list", help="list searchers, tasks, model sources, engines and transforms; or one plugin's options")
    ls.add_argument("name", nargs="?", help="show this plugin's options (type, default, help)")
    cv = sub.add_parser("convert", help="checkpoints of any supported layout → plain safetensors + manifest")
    cv.add_argument("--pretrained", required=True, help="CLIPModel folder, open_clip state dict or pickled model")
    cv.add_argument("--checkpoints", required=True, help="NAME=PATH,...: CLIPVisionModel/LoRA folders, state dicts, pickles")
    cv.add_argument("--out", required=True, help="folder for the converted files and manifest.json")
    cv.add_argument("--replace", action="store_true",
                    help="replace a non-empty --out (only once the new conversion is complete)")
    ck = sub.add_parser("check-plugin", help="run the conformance suite on an installed plugin")
    ck.add_argument("name", help="plugin name (or module:Class)")
    ck.add_argument("--kind", choices=["searcher", "task", "source", "engine", "transform"], help="when the name is ambiguous")
    ck.add_argument("-s", dest="searcher_options", action="append", metavar="KEY=VALUE",
                    help="searcher option for a searcher plugin (repeatable)")
    ck.add_argument("-t", dest="task_options", action="append", metavar="KEY=VALUE",
                    help="task options (for a source: e.g. -t source_options=...; for an engine: the task it runs)")
    ck.add_argument("--cache-dir", dest="cache_dir", help=CACHE_HELP)
    lb = sub.add_parser("leaderboard", help="rank recorded runs")
    lb.add_argument("--results-dir", dest="results_dir", default="results", help="where the runs were recorded")
    lb.add_argument("--task", help="only this task")
    lb.add_argument("--searcher", help="only this searcher")
    lb.add_argument("--family", help="only runs on this checkpoint family (a prefix of the family column)")
    lb.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG curves and the HTML page")
    sw = sub.add_parser("sweep", help="run searchers × tasks × seeds (skipping recorded runs), then the leaderboard")
    sw.add_argument("--file", help="TOML sweep file (see README)")
    sw.add_argument("--searchers", help="comma-separated searcher names")
    sw.add_argument("--tasks", help="comma-separated task names")
    sw.add_argument("--seeds", help="comma-separated seeds (default 0,1)")
    sw.add_argument("--budget", type=int, help="evaluations per run (default: each searcher's)")
    sw.add_argument("--space", help="coefficient space of every run (default: each searcher's)")
    sw.add_argument("-s", dest="searcher_options", action="append", metavar="KEY=VALUE",
                    help="searcher option for every run (repeatable)")
    sw.add_argument("-t", dest="task_options", action="append", metavar="KEY=VALUE",
                    help="task option for every run (repeatable)")
    sw.add_argument("--results-dir", dest="results_dir", help="default: the sweep file's, else results")
    sw.add_argument("--cache-dir", dest="cache_dir", help=CACHE_HELP)
    sw.add_argument("--workers", type=int, default=0, help="Ray workers per run (0: in this process)")
    sw.add_argument("--device", help="torch device of every run: cpu (default), cuda or cuda:N")
    sw.add_argument("--quiet", action="store_true", help="no progress bars")
    pl = sub.add_parser("plot", help="heat map of one run's coefficients")
    pl.add_argument("run_id", help="the run to plot (a folder name under RESULTS_DIR/runs)")
    pl.add_argument("--results-dir", dest="results_dir", default="results", help="where the run was recorded")
    zoo = sub.add_parser("zoo", help="build or describe a model zoo")
    zoo.add_argument("action", choices=["build", "info", "list"],
                     help="build: make and cache a zoo; info: its data sets and accuracies; list: the zoos")
    zoo.add_argument("name", nargs="?", default="effnet", help="the zoo (a model source: effnet or tiny-clip)")
    zoo.add_argument("--cache-dir", dest="cache_dir", help=CACHE_HELP)
    zoo.add_argument("--force", action="store_true", help="rebuild even if cached")
    ft = sub.add_parser("finetune", help="fine-tune your open_clip model per data set: checkpoints for -t checkpoints")
    ft.add_argument("--model", default="", help="open_clip architecture, e.g. ViT-B-32 (not needed with local-dir:)")
    ft.add_argument("--pretrained", default="", help="pre-trained weights: a local file or local-dir:DIR")
    ft.add_argument("--datasets", help="comma-separated data sets (built-in, folders or benchmark data sets under --data-root)")
    ft.add_argument("--suite", help="instead of --datasets: a benchmark suite (ta8, tall14, tall20, atlas22) under --data-root")
    ft.add_argument("--data-root", dest="data_root", help="image folders DIR/<data set>/<split>/<class>/*.png")
    ft.add_argument("--out", required=True, help="folder for the fine-tuned checkpoints (<data set>.safetensors)")
    ft.add_argument("--steps", type=int, default=500, help="optimiser steps per data set")
    ft.add_argument("--batch-size", dest="batch_size", type=int, default=128, help="images per step")
    ft.add_argument("--lr", type=float, default=1e-5, help="peak learning rate of AdamW, one-cycle (default 1e-5)")
    ft.add_argument("--seed", type=int, default=0, help="seed of the data order and the validation split")
    ft.add_argument("--max-n", dest="max_n", type=int, default=4000, help="images per built-in data set")
    data = sub.add_parser("data", help="the field's benchmark data: list suites, check a data root")
    data.add_argument("action", choices=["check", "suites"], help="check: what --data-root holds of a suite; suites: list them")
    data.add_argument("--suite", help="ta8, ta8-atlas, tall14, tall20 or atlas22")
    data.add_argument("--datasets", help="comma-separated data sets instead of a suite (either naming)")
    data.add_argument("--data-root", dest="data_root", help="the folder holding the data sets")
    data.add_argument("--convention", default="auto", help="auto (default), tv (task_vectors layout) or hf (Parquet)")
    data.add_argument("--val-rule", dest="val_rule", default="atlas", help="atlas (at most 5,000) or fusionbench (no cap)")
    data.add_argument("--decode", action="store_true", help="also decode every image (finds corrupt files)")
    data.add_argument("--workers", type=int, default=2, help="processes that decode with --decode (default 2)")
    bench = sub.add_parser("bench", help="run a benchmark suite (several searchers, same seeds)")
    bench.add_argument("suite", help="addition | negation | perf (the performance ratios of docs/performance.md)")
    bench.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    bench.add_argument("--results-dir", dest="results_dir", default=None, help="default results/bench-SUITE")
    bench.add_argument("--cache-dir", dest="cache_dir", help=CACHE_HELP)
    bench.add_argument("-t", dest="task_options", action="append", metavar="KEY=VALUE", help="task option (repeatable)")
    bench.add_argument("--only", default=None, help="perf only: comma-separated subset of "
                       "throughput,overhead,fidelity,memory,selection (default all)")
    return parser


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
    for ds in datasets:
        tv = finetune(source, ds, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
        source.task_vectors[ds] = tv
        path = out / f"{ds}.safetensors"
        save_state_dict({f"visual.{k}": source.base[k] + v for k, v in tv.items()}, path)
        zs, ft = source.accuracy(source.base, ds, "test"), source.accuracy(source.finetuned(ds), ds, "test")
        print(f"{ds}: test accuracy {zs:.4f} -> {ft:.4f}; wrote {path}")
    print(f"use them with: -t checkpoints={out}")
    return 0


def cmd_bench(args) -> int:
    from harness import bench
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


def cmd_run(args) -> int:
    from harness.config import build_config
    from harness.runner import run
    flags = {k: v for k, v in vars(args).items() if k != "command"}
    flags["searcher_options"] = _pairs(args.searcher_options, "-s")
    flags["task_options"] = _pairs(args.task_options, "-t")
    if args.data_root is not None:
        flags["task_options"] = {**(flags["task_options"] or {}), "data_root": args.data_root}
    cfg = build_config(flags)
    if hint := gradient_hint(cfg):
        print(hint, file=sys.stderr)
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
    from harness import registry
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
    from harness.leaderboard import leaderboard
    from harness.plots import show
    from harness.results import read_records
    records = read_records(args.results_dir)
    board = leaderboard(args.results_dir, task=args.task, searcher=args.searcher, family_prefix=args.family, records=records)
    if board.empty:
        raise HarnessError(f"no completed runs under {args.results_dir}/runs; run `python -m harness run` first")
    show(board, args.results_dir, plots=args.plots, records=records, task=args.task, searcher=args.searcher,
         family_prefix=args.family)
    return 0


def cmd_sweep(args) -> int:
    from harness.sweep import load_sweep, run_sweep
    run_sweep(load_sweep(args), log=lambda m: print(m, file=sys.stderr), show=True)
    return 0


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
    from harness import registry
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


COMMANDS = {"check-plugin": cmd_check_plugin, "presets": cmd_presets, "convert": cmd_convert, "finetune": cmd_finetune, "run": cmd_run, "list": cmd_list, "leaderboard": cmd_leaderboard, "zoo": cmd_zoo, "bench": cmd_bench,
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
