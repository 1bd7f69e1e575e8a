"""Leaderboards: run records → one pandas table, grouped by task × searcher × setting over seeds."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from harness.results import iter_records

# Config fields that describe a searcher's setting in the leaderboard (the seed is aggregated).
_SETTING_FIELDS = ("space", "budget", "batch_size")


def _defaults(searcher: str) -> dict:
    """The searcher's option defaults (empty if it is not installed here)."""
    try:
        from harness import registry
        cls = registry.load("searcher", searcher)
        return {n: d for n, _, d, _ in registry.options_table_of(cls)}
    except Exception:  # a record from a plugin not installed here: show every option
        return {}


def _setting(rec: dict) -> str:
    """Space, budget, batch and every option that differs from the searcher's default (falsy values too)."""
    cfg = rec.get("config", {})
    parts = [f"{cfg.get('space')}", f"{cfg.get('budget')} evals"]
    if cfg.get("batch_size", 1) != 1:
        parts.append(f"batch {cfg.get('batch_size')}")
    defaults = _defaults(rec.get("searcher", ""))
    parts += [f"{k}={v}" for k, v in sorted(cfg.get("searcher_options", {}).items()) if defaults.get(k) != repr(v)]
    return ", ".join(parts)


def _task_label(rec: dict) -> str:
    """The task and its non-default options, e.g. ``negation[target=cvdigits]``."""
    opts = rec.get("config", {}).get("task_options", {})
    defaults = rec.get("task_defaults", {})
    shown = {k: v for k, v in opts.items() if defaults.get(k, v) != v and k != "transform"}
    return rec["task"] + (f"[{','.join(f'{k}={v}' for k, v in sorted(shown.items()))}]" if shown else "")


def transform(rec: dict) -> str:
    """The task-vector transform a run composed over (``ties:merge=sum``), or ``—``."""
    return rec.get("config", {}).get("task_options", {}).get("transform") or "—"


def family(rec: dict) -> str:
    """The checkpoint family a run composed: ``pretrained hash/task-vector hash`` (8 characters
    each), or ``—`` for tasks that compose no checkpoints."""
    fam = rec.get("family") or {}
    return f"{fam['pretrained'][:8]}/{fam['task_vectors'][:8]}" if fam.get("pretrained") else "—"


def runs_frame(results_dir: str | Path, task: str | None = None, searcher: str | None = None,
               family_prefix: str | None = None) -> pd.DataFrame:
    """One row per completed run: identity, setting, checkpoint family, headline value and cost."""
    rows = []
    for rec in iter_records(results_dir):
        if task and rec["task"] != task:
            continue
        if family_prefix and not family(rec).startswith(family_prefix):
            continue
        if searcher and rec["searcher"] != searcher:
            continue
        final = rec.get("final") or {}
        head = rec.get("headline")
        value = final.get(head)
        rows.append({
            "task": _task_label(rec), "searcher": rec["searcher"], "transform": transform(rec),
            "setting": _setting(rec), "key": rec.get("key"),
            "family": family(rec), "data": rec.get("data_touched", "?"),
            "seed": rec.get("seed"), "headline": head, "higher_is_better": rec.get("higher_is_better", True),
            "value": float("nan") if value is None else float(value),
            "constraint_ok": bool(rec.get("constraint_ok", True) if rec.get("constraint_ok") is not None else True),
            "evaluations": rec.get("evaluations"), "wall_time_s": rec.get("wall_time_s"),
            "peak_rss_mb": rec.get("peak_rss_mb"), "run_id": rec.get("run_id"),
        })
    return pd.DataFrame(rows)


def leaderboard(results_dir: str | Path, task: str | None = None, searcher: str | None = None,
                family_prefix: str | None = None) -> pd.DataFrame:
    """Mean ± std and n of each task's headline metric over seeds, ranked within each task.

    Runs that break their task's constraint (negation: control accuracy below 95% of zero-shot)
    are counted in ``n_ok`` but not ranked on. Runs on different checkpoint families never share
    a row; ``family_prefix`` keeps only the families whose label starts with it.
    """
    runs = runs_frame(results_dir, task, searcher, family_prefix)
    if runs.empty:
        return runs
    groups = []
    for (t, s, key, fam), g in runs.groupby(["task", "searcher", "key", "family"], sort=False):
        data = g["data"].iloc[0]
        ok = g[g["constraint_ok"]]
        vals = ok["value"]
        groups.append({
            "task": t, "searcher": s, "transform": g["transform"].iloc[0], "setting": g["setting"].iloc[0], "family": fam, "data": data,
            "metric": g["headline"].iloc[0],
            "mean": vals.mean() if len(vals) else float("nan"),
            "std": vals.std(ddof=1) if len(vals) > 1 else float("nan"),
            "n": len(g), "n_ok": len(ok), "higher_is_better": bool(g["higher_is_better"].iloc[0]),
            "evaluations": g["evaluations"].mean(), "wall_time_s": g["wall_time_s"].mean(),
            "peak_rss_mb": g["peak_rss_mb"].mean(),
        })
    board = pd.DataFrame(groups)
    ranked = []
    for t, g in board.groupby("task", sort=True):
        asc = not g["higher_is_better"].iloc[0]
        g = g.sort_values("mean", ascending=asc, na_position="last").copy()
        g["rank"] = g["mean"].rank(ascending=asc, method="min")
        ranked.append(g)
    board = pd.concat(ranked, ignore_index=True)
    cols = ["task", "rank", "searcher", "transform", "setting", "family", "data", "metric", "mean", "std", "n", "n_ok",
            "evaluations", "wall_time_s", "peak_rss_mb"]
    return board[cols]


def format_board(board: pd.DataFrame) -> pd.DataFrame:
    """Human-readable copy: ``mean ± std`` in one column, costs rounded."""
    def pm(r):
        if math.isnan(r["mean"]):
            return "—"
        return f"{r['mean']:.4f}" + ("" if math.isnan(r["std"]) else f" ± {r['std']:.4f}")
    out = board.copy()
    out["rank"] = out["rank"].map(lambda v: "—" if pd.isna(v) else str(int(v)))
    out.insert(out.columns.get_loc("mean"), "score", out.apply(pm, axis=1))
    out = out.drop(columns=["mean", "std"])
    out["evaluations"] = out["evaluations"].map(lambda v: f"{v:.0f}")
    out["wall_time_s"] = out["wall_time_s"].map(lambda v: f"{v:.1f}")
    out["peak_rss_mb"] = out["peak_rss_mb"].map(lambda v: "" if pd.isna(v) else f"{v:.0f}")
    return out.rename(columns={"wall_time_s": "wall s", "peak_rss_mb": "peak MB", "evaluations": "evals"})


def markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (pandas' own needs the optional ``tabulate``)."""
    cells = [[str(c) for c in df.columns]] + [["" if pd.isna(v) else str(v) for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(r) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("---" for _ in df.columns) + "|")
    return "\n".join(lines)


def write(board: pd.DataFrame, out_dir: str | Path, name: str = "leaderboard") -> list[Path]:
    """Write Markdown and CSV (raw numbers) next to the runs; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, csv = out_dir / f"{name}.md", out_dir / f"{name}.csv"
    board.to_csv(csv, index=False)
    md.write_text(markdown(format_board(board)) + "\n" if not board.empty else "(no runs)\n")
    return [md, csv]
