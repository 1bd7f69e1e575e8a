"""Plots (matplotlib, PNG) and the self-contained HTML leaderboard page."""
from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np
import pandas as pd

from harness.results import RunStore, iter_records, load_coefficients


def _plt():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt
    return plt


def curves(results_dir: str | Path, task: str | None = None, searcher: str | None = None) -> dict[str, pd.DataFrame]:
    """Best-so-far search loss per evaluation for every completed run, grouped by task.

    Returns ``{task: frame}`` with columns label, seed, evaluation, wall_s, best.
    """
    out: dict[str, list[pd.DataFrame]] = {}
    for rec in iter_records(results_dir):
        if (task and rec["task"] != task) or (searcher and rec["searcher"] != searcher):
            continue
        rows = RunStore(results_dir, rec["run_id"]).trace(warn=False)
        pts = [(r["i"], r.get("t", 0.0), r["best"]) for r in rows if r.get("best") is not None]
        if not pts:
            continue
        cfg = rec["config"]
        label = f"{rec['searcher']} {cfg.get('space')} b{cfg.get('budget')}"
        df = pd.DataFrame(pts, columns=["evaluation", "wall_s", "best"]).assign(label=label, seed=rec["seed"])
        out.setdefault(rec["task"], []).append(df)
    return {t: pd.concat(v, ignore_index=True) for t, v in out.items()}


def plot_curves(results_dir: str | Path, out_dir: str | Path, **filters) -> list[Path]:
    """Per task: best-so-far vs evaluations and vs wall time, mean and min–max band over seeds."""
    plt = _plt()
    paths = []
    for task, df in curves(results_dir, **filters).items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for label, g in df.groupby("label"):
            for ax, xcol in zip(axes, ("evaluation", "wall_s")):
                grid = np.linspace(g[xcol].min(), g[xcol].max(), 100)
                # Each seed's best-so-far is a step function: sample it on a common grid.
                ys = []
                for _, s in g.groupby("seed"):
                    s = s.sort_values(xcol)
                    idx = np.searchsorted(s[xcol].to_numpy(), grid, side="right") - 1
                    y = np.where(idx >= 0, s["best"].to_numpy()[np.clip(idx, 0, None)], np.nan)
                    ys.append(y)
                ys = np.array(ys)
                mean = np.nanmean(ys, axis=0)
                line, = ax.plot(grid, mean, label=f"{label} (n={len(ys)})")
                if len(ys) > 1:
                    ax.fill_between(grid, np.nanmin(ys, axis=0), np.nanmax(ys, axis=0), alpha=0.2, color=line.get_color())
        for ax, xl in zip(axes, ("evaluations", "wall time (s)")):
            ax.set_xlabel(xl)
            ax.set_ylabel("best search loss so far")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{task}: best-so-far search loss (mean over seeds, band = min–max)")
        fig.tight_layout()
        path = Path(out_dir) / f"curves-{task}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_coefficients(record: dict, out_path: str | Path) -> Path:
    """Heat map of one run's coefficients: task vectors (rows) × blocks (columns)."""
    plt = _plt()
    coef = load_coefficients(record["coefficients"])
    mat = coef.get("coefficients", coef["x"][None, :])
    if mat.ndim == 3:  # per_partition: average the K partitions of each block
        mat = mat.mean(-1)
    fig, ax = plt.subplots(figsize=(min(16, 2 + 0.12 * mat.shape[1]), 1.2 + 0.45 * mat.shape[0]))
    lim = float(np.abs(mat).max()) or 1.0
    im = ax.imshow(mat, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    names = record.get("task_vectors") or [f"τ{i}" for i in range(mat.shape[0])]
    ax.set_yticks(range(mat.shape[0]), names)
    ax.set_xlabel("block (parameter tensor, in model order)")
    ax.set_title(f"{record['run_id']}: learned coefficients λ")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def html_page(board: pd.DataFrame, images: list[Path], title: str = "aTLAS harness leaderboard") -> str:
    """A self-contained HTML page: the leaderboard table and the PNGs inlined as data URIs."""
    from harness.leaderboard import format_board
    table = format_board(board).to_html(index=False, border=0, classes="board", na_rep="")
    imgs = []
    for p in images:
        data = base64.b64encode(Path(p).read_bytes()).decode()
        imgs.append(f'<figure><img alt="{html.escape(p.name)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{html.escape(p.name)}</figcaption></figure>")
    style = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222}table.board{border-collapse:collapse}"
             "table.board th,table.board td{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}"
             "table.board th{background:#f3f3f3}img{max-width:100%}figure{margin:1.5em 0}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{table}{''.join(imgs)}</body></html>\n")
