"""Leaderboards: run records → one pandas table, grouped by task × searcher × setting over seeds.

Records are read once per command (:func:`harness.records.read_records`): a record that cannot be
used is named in one warning line on stderr and left out; every other run is still ranked.
"""
from __future__ import annotations

import functools
import io
import math
from pathlib import Path

import pandas as pd

from harness.records import read_records
from harness.results import atomic_write

# Config fields that describe a searcher's setting in the leaderboard (the seed is aggregated).
_SETTING_FIELDS = ("space", "budget", "batch_size")

COLUMNS = ["task", "rank", "searcher", "transform", "setting", "family", "data", "params", "metric", "mean", "std", "n", "n_ok",
           "evaluations", "wall_time_s", "peak_rss_mb"]


@functools.lru_cache(maxsize=None)
def _defaults(searcher: str) -> dict:
    """The option defaults (``repr`` text) of an installed searcher; empty for a name that is not
    a registered plugin (record text is never imported as ``module:Class``)."""
    try:
        import harness.registry as registry
        if searcher not in registry.names("searcher"):
            return {}
        cls = registry.load("searcher", searcher)
        return {n: d for n, _, d, _ in registry.options_table_of(cls)}
    except Exception:  # a plugin that fails to load here: show every option
        return {}


def _setting(rec: dict) -> str:
    """Space, budget, batch and every option that differs from the searcher's default (falsy values too)."""
    cfg = rec["config"]
    parts = [f"{cfg['space']}", f"{cfg['budget']} evals"]
    if cfg.get("batch_size") not in (None, 1):
        parts.append(f"batch {cfg['batch_size']}")
    defaults = _defaults(rec["searcher"])
    parts += [f"{k}={v}" for k, v in sorted((cfg.get("searcher_options") or {}).items()) if defaults.get(k) != repr(v)]
    return ", ".join(parts)


def task_label(rec: dict) -> str:
    """The task, with its target data set where it has one: ``negation:mnist``."""
    target = (rec["config"].get("task_options") or {}).get("target")
    return rec["task"] + (f":{target}" if target else "")


def transform(rec: dict) -> str:
    """The task-vector transform a run composed over (``ties:merge=sum``), or ``—``."""
    return (rec["config"].get("task_options") or {}).get("transform") or "—"


def family(rec: dict) -> str:
    """The checkpoint family a run composed: ``pretrained hash/task-vector hash`` (8 characters
    each), or ``—`` for tasks that compose no checkpoints."""
    fam = rec.get("family") or {}
    if not fam.get("pretrained"):
        return "—"
    label = f"{fam['pretrained'][:8]}/{fam['task_vectors'][:8]}"
    bench = fam.get("benchmark")
    if isinstance(bench, dict) and isinstance(fam.get("data"), str):
        # Benchmark data: the suite and a hash of what was scored, so other data never pools.
        label += f"/{bench.get('suite') or 'data'}:{fam['data'][:6]}"
    return label


def paper_figure(rec: dict) -> str:
    """The aTLAS paper's figure for this run's protocol, suite and architecture, or ``""``."""
    from harness.data.paper import figure
    bench = (rec.get("family") or {}).get("benchmark")
    if not isinstance(bench, dict):
        return ""
    suite, arch = bench.get("suite"), bench.get("architecture")
    return figure(rec["task"], rec["searcher"], str(rec["config"].get("space")),
                  suite if isinstance(suite, str) else None, arch if isinstance(arch, str) else None)


def select(records, task: str | None = None, searcher: str | None = None,
           family_prefix: str | None = None) -> list[tuple[Path, dict]]:
    """The ``(run folder, record)`` pairs of ``records`` that pass the filters (the table and the
    curves use the same ones): ``task`` and ``searcher`` are plugin names, ``family_prefix`` a
    prefix of the family column."""
    return [(d, rec) for d, rec in records
            if (not task or rec["task"] == task) and (not searcher or rec["searcher"] == searcher)
            and (not family_prefix or family(rec).startswith(family_prefix))]


def runs_frame(results_dir: str | Path, task: str | None = None, searcher: str | None = None,
               family_prefix: str | None = None, records=None, labels: dict | None = None) -> pd.DataFrame:
    """One row per completed run: identity, setting, checkpoint family, headline value and cost.

    ``records`` are ``(run folder, record)`` pairs already read (default: read ``results_dir``);
    ``labels`` maps a run key to the name shown in the searcher column (a sweep entry's ``label``).
    """
    if records is None:
        records = read_records(results_dir)
    labels = labels or {}
    rows = []
    for _, rec in select(records, task, searcher, family_prefix):
        rows.append({
            "task": task_label(rec), "searcher": labels.get(rec["key"]) or rec["searcher"], "transform": transform(rec),
            "setting": _setting(rec), "key": rec["key"],
            "family": family(rec), "data": rec.get("data_touched") or "?",
            "params": rec.get("learnable_parameters"),
            "seed": rec["seed"], "headline": rec["headline"], "higher_is_better": rec["higher_is_better"],
            "value": float(rec["final"][rec["headline"]]),
            "constraint_ok": rec.get("constraint_ok") is not False,
            "evaluations": rec["evaluations"], "wall_time_s": float(rec["wall_time_s"]),
            "peak_rss_mb": float("nan") if rec.get("peak_rss_mb") is None else float(rec["peak_rss_mb"]),
            "run_id": rec["run_id"], "paper": paper_figure(rec),
        })
    return pd.DataFrame(rows)


def _params(values) -> str:
    """A group's learnable parameter count as text: ``?`` for runs recorded before it was counted."""
    known = {int(v) for v in values if v is not None and v == v}
    return "?" if not known else "/".join(str(v) for v in sorted(known))


def leaderboard(results_dir: str | Path, task: str | None = None, searcher: str | None = None,
                family_prefix: str | None = None, records=None, labels: dict | None = None) -> pd.DataFrame:
    """Mean ± std and n of each task's headline metric over seeds, ranked within each task.

    Runs that break their task's constraint (negation: control accuracy below 95% of zero-shot)
    are counted in ``n_ok`` but not ranked on. Runs on different checkpoint families never share
    a row; ``family_prefix`` keeps only the families whose label starts with it. With no run to
    rank, the frame is empty but has the columns. ``records`` and ``labels``: see :func:`runs_frame`.
    """
    runs = runs_frame(results_dir, task, searcher, family_prefix, records, labels)
    if runs.empty:
        return pd.DataFrame(columns=COLUMNS)
    groups = []
    for (t, s, key, fam), g in runs.groupby(["task", "searcher", "key", "family"], sort=False):
        data = g["data"].iloc[0]
        ok = g[g["constraint_ok"]]
        vals = ok["value"]
        groups.append({
            "task": t, "searcher": s, "transform": g["transform"].iloc[0], "setting": g["setting"].iloc[0], "family": fam, "data": data,
            "params": _params(g["params"]), "metric": g["headline"].iloc[0],
            "mean": vals.mean() if len(vals) else float("nan"),
            "std": vals.std(ddof=1) if len(vals) > 1 else float("nan"),
            "n": len(g), "n_ok": len(ok), "higher_is_better": bool(g["higher_is_better"].iloc[0]),
            "evaluations": g["evaluations"].mean(), "wall_time_s": g["wall_time_s"].mean(),
            "peak_rss_mb": g["peak_rss_mb"].mean(), "paper": g["paper"].iloc[0],
        })
    board = pd.DataFrame(groups)
    ranked = []
    for t, g in board.groupby("task", sort=True):
        asc = not g["higher_is_better"].iloc[0]
        g = g.sort_values("mean", ascending=asc, na_position="last").copy()
        g["rank"] = g["mean"].rank(ascending=asc, method="min")
        ranked.append(g)
    board = pd.concat(ranked, ignore_index=True)
    # The paper's figure beside rows that ran its protocol on its suite and architecture.
    return board[COLUMNS + (["paper"] if board["paper"].astype(bool).any() else [])]


def format_board(board: pd.DataFrame) -> pd.DataFrame:
    """Human-readable copy: ``mean ± std`` in one column, costs rounded."""
    def pm(r):
        if math.isnan(r["mean"]):
            return "—"
        return f"{r['mean']:.4f}" + ("" if math.isnan(r["std"]) else f" ± {r['std']:.4f}")
    if board.empty:
        cols = [c for c in board.columns if c not in ("mean", "std")]
        cols.insert(cols.index("metric") + 1 if "metric" in cols else len(cols), "score")
        board = pd.DataFrame(columns=cols)
        return board.rename(columns={"wall_time_s": "wall s", "peak_rss_mb": "peak MB", "evaluations": "evals"})
    out = board.copy()
    out["rank"] = out["rank"].map(lambda v: "—" if pd.isna(v) else str(int(v)))
    out.insert(out.columns.get_loc("mean"), "score", out.apply(pm, axis=1))
    out = out.drop(columns=["mean", "std"])
    out["evaluations"] = out["evaluations"].map(lambda v: f"{v:.0f}")
    out["wall_time_s"] = out["wall_time_s"].map(lambda v: f"{v:.1f}")
    out["peak_rss_mb"] = out["peak_rss_mb"].map(lambda v: "" if pd.isna(v) else f"{v:.0f}")
    return out.rename(columns={"wall_time_s": "wall s", "peak_rss_mb": "peak MB", "evaluations": "evals"})


def board_text(board: pd.DataFrame) -> str:
    """The table as printed by ``leaderboard`` and ``sweep`` (``(no completed runs)`` when empty)."""
    if board.empty:
        return "(no completed runs)"
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.max_colwidth", 60):
        return format_board(board).to_string(index=False)


def markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (pandas' own needs the optional ``tabulate``)."""
    cells = [[str(c) for c in df.columns]] + [["" if pd.isna(v) else str(v) for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(r) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("---" for _ in df.columns) + "|")
    return "\n".join(lines)


def write(board: pd.DataFrame, out_dir: str | Path, name: str = "leaderboard") -> list[Path]:
    """Write Markdown and CSV (raw numbers) next to the runs, each whole or not at all (a
    temporary file renamed over it); returns the paths written. Raises OSError if it cannot."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, csv = out_dir / f"{name}.md", out_dir / f"{name}.csv"
    buf = io.StringIO()
    board.to_csv(buf, index=False)
    atomic_write(csv, buf.getvalue())
    atomic_write(md, markdown(format_board(board)) + "\n" if not board.empty else "(no runs)\n")
    return [md, csv]
