"""The command line's parser: every command, flag, default and help text (``python -m harness -h``).

Kept apart from the commands (:mod:`harness.cli`) so that the docs' command reference
(``scripts/gen_docs.py``) and the tests read the same parser the CLI runs.
"""
from __future__ import annotations

import argparse

from harness.api import HarnessError

TRUST_HELP = ("run even when a fine-tuned checkpoint does not beat the pre-trained model on its own data set's "
              "validation split (the checkpoint check of your own checkpoints; each failure becomes a warning line)")
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
    p.add_argument("--space", help="per_task | per_layer | per_block | per_partition:K[:matrices] | lines (LiNeS: first and last layer's "
                                       "scale) | norms (norm-layer tuning, tta) (default: the searcher's)")
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
    p.add_argument("--resume", metavar="RUN_ID", help="resume this run id with its recorded settings (the same command also resumes by itself)")
    p.add_argument("--trust-checkpoints", dest="trust_checkpoints", action="store_true", help=TRUST_HELP)


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
    cc = sub.add_parser("check-checkpoints", help="does each fine-tuned checkpoint beat the pre-trained model on its own "
                        "data set? prints the validation accuracy table; exit 1 when one does not")
    cc.add_argument("--config", help="TOML file with the same keys as run's flags (only the task and its options matter)")
    cc.add_argument("--preset", help="a published method's settings, as for run (only the task and its options matter)")
    cc.add_argument("--task", help="task plugin whose model source is checked (default: addition)")
    cc.add_argument("-t", dest="task_options", action="append", metavar="KEY=VALUE",
                    help="task option (repeatable), as for run: checkpoints, pretrained, model, source, ...")
    cc.add_argument("--data-root", dest="data_root", metavar="DIR", help="image folders or benchmark data sets, as for run "
                    "(same as -t data_root=DIR)")
    cc.add_argument("--cache-dir", dest="cache_dir", help=CACHE_HELP)
    cc.add_argument("--quiet", action="store_true", default=None, help="no progress output while the source is built")
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
    sw.add_argument("--trust-checkpoints", dest="trust_checkpoints", action="store_true", help=TRUST_HELP)
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
    ft.add_argument("--mode", choices=["standard", "linear"], default="standard",
                    help="standard: fine-tune the weights; linear: fine-tune the linearised model in the tangent space "
                         "at the pre-trained weights (compose with -t linearize=true)")
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
