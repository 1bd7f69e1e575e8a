"""Plots (matplotlib, PNG) and the self-contained HTML leaderboard page.

File names are never taken from record text as they stand: a task label becomes a safe slug
(letters, digits, ``.``, ``_``, ``-``), and every file is checked to lie inside its output folder.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from harness.api import HarnessError
from harness.records import _is_number, read_records
from harness.results import atomic_write, load_coefficients, read_jsonl


def _plt():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt
    return plt


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str, taken: set[str] | None = None) -> str:
    """``text`` as a file-name slug: runs of other characters (and of two or more dots) become
    ``_``, no leading dot, at most 80 characters; a slug already in ``taken`` gets a short hash of
    the text, so two labels never share a file. The slug is added to ``taken``."""
    slug = re.sub(r"_+", "_", re.sub(r"\.\.+", "_", _UNSAFE.sub("_", text))).strip("._-")[:80] or "task"
    taken = set() if taken is None else taken
    if slug in taken:
        slug = f"{slug}-{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"
    taken.add(slug)
    return slug


def inside(path: Path, folder: Path) -> Path:
    """``path`` if it resolves inside ``folder``; otherwise a HarnessError (never written)."""
    if not path.resolve().is_relative_to(folder.resolve()):
        raise HarnessError(f"refusing to write {path}: it is outside {folder}")
    return path


def _save(fig, path: Path) -> None:
    """The figure as PNG, written whole or not at all."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write(path, buf.getvalue())


def _points(rows: list[dict]) -> list[tuple[float, float, float]]:
    """``(evaluation, wall s, best so far)`` of the trace rows that have finite numbers there."""
    pts = []
    for r in rows:
        i, t, best = r.get("i"), r.get("t", 0.0), r.get("best")
        if _is_number(i) and _is_number(t) and _is_number(best):
            pts.append((float(i), float(t), float(best)))
    return pts


def curves(results_dir: str | Path, task: str | None = None, searcher: str | None = None,
           family_prefix: str | None = None, records=None, labels: dict | None = None) -> dict[str, pd.DataFrame]:
    """Best-so-far search loss per evaluation for every completed run, grouped by task label
    (``negation:mnist``), with the same filters as the leaderboard table.

    Returns ``{task label: frame}`` with columns curve, label, seed, evaluation, wall_s, best. One
    curve is one setting: the run key (searcher, its options, space, budget, task options with
    the transform) and the checkpoint family, as one leaderboard row. ``label`` is the curve's
    legend text (searcher or sweep label, transform, setting), made unique within the task.
    ``records``/``labels``: see :func:`harness.leaderboards.runs_frame`.
    """
    from harness.leaderboards import _setting, family, select, task_label, transform
    if records is None:
        records = read_records(results_dir)
    labels = labels or {}
    out: dict[str, list[pd.DataFrame]] = {}
    for run_dir, rec in select(records, task, searcher, family_prefix):
        path = run_dir / "trace.jsonl"
        rows = read_jsonl(path, warn=False)  # a trace that is not a file is reported by read_jsonl itself
        if len(rows) < rec.get("evaluations", 0) and (path.is_file() or not path.exists()):  # torn: partial
            print(f"warning: the trace of run {run_dir.name} holds {len(rows)} of its {rec['evaluations']} "
                  "evaluations (torn, corrupt or missing lines); its curve is partial", file=sys.stderr)
        pts = _points(rows)
        if not pts:
            continue
        fam, tf = family(rec), transform(rec)
        label = " ".join([labels.get(rec["key"]) or rec["searcher"], *([tf] if tf != "—" else []), _setting(rec),
                          *([f"[{fam}]"] if fam != "—" else [])])
        df = pd.DataFrame(pts, columns=["evaluation", "wall_s", "best"]).assign(
            curve=f"{rec['key']}|{fam}", label=label, seed=rec["seed"])
        out.setdefault(task_label(rec), []).append(df)
    frames = {}
    for t, v in out.items():
        df = pd.concat(v, ignore_index=True)
        shared = df.groupby("label")["curve"].nunique()
        for lab in shared[shared > 1].index:  # one text, several settings: name each by its key
            sel = df["label"] == lab
            df.loc[sel, "label"] = df.loc[sel, "label"] + " [" + df.loc[sel, "curve"].str.split("|").str[0] + "]"
        frames[t] = df
    return frames


def plot_curves(results_dir: str | Path, out_dir: str | Path, **filters) -> list[Path]:
    """Per task label: best-so-far vs evaluations and vs wall time, mean and min–max band over
    seeds, one line per setting; ``plots/curves-<slug>.png``. ``filters`` go to :func:`curves`."""
    plt = _plt()
    out_dir = Path(out_dir)
    paths, taken = [], set()
    for task, df in sorted(curves(results_dir, **filters).items()):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for (_, label), g in df.groupby(["curve", "label"]):
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
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # grid points before a seed's first row
                    mean, lo, hi = np.nanmean(ys, axis=0), np.nanmin(ys, axis=0), np.nanmax(ys, axis=0)
                line, = ax.plot(grid, mean, label=f"{label} (n={len(ys)})")
                if len(ys) > 1:
                    ax.fill_between(grid, lo, hi, alpha=0.2, color=line.get_color())
        for ax, xl in zip(axes, ("evaluations", "wall time (s)")):
            ax.set_xlabel(xl)
            ax.set_ylabel("best search loss so far")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{task}: best-so-far search loss (mean over seeds, band = min–max)")
        fig.tight_layout()
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            path = inside(out_dir / f"curves-{safe_name(task, taken)}.png", out_dir)
            _save(fig, path)
        finally:
            plt.close(fig)
        paths.append(path)
    return paths


def plot_coefficients(record: dict, out_path: str | Path, run_dir: str | Path | None = None) -> Path:
    """Heat map of one run's coefficients: task vectors (rows) × blocks (columns).

    The coefficients are read from ``run_dir/coefficients.safetensors`` (the run's own folder,
    wherever the results folder now is); without ``run_dir``, from the path in the record. A
    missing or unreadable file, or one that cannot be written, is a one-line HarnessError.
    """
    plt = _plt()
    src = Path(run_dir) / "coefficients.safetensors" if run_dir is not None else Path(str(record.get("coefficients")))
    run_id = str(record.get("run_id") or (Path(run_dir).name if run_dir else "run"))
    if not src.is_file():
        raise HarnessError(f"run {run_id} has no coefficients file ({src} is missing)")
    try:
        coef = load_coefficients(src)
        mat = np.asarray(coef.get("coefficients", coef["x"][None, :]), dtype=np.float64)
    except Exception as e:  # safetensors raises its own errors on a damaged file
        raise HarnessError(f"cannot read the coefficients of run {run_id} ({src}): {type(e).__name__}: "
                           f"{' '.join(str(e).split())[:120]}") from None
    if mat.ndim == 3:  # per_partition: average the K partitions of each block
        mat = mat.mean(-1)
    if mat.ndim == 1:
        mat = mat[None, :]
    if mat.ndim != 2 or mat.size == 0:
        raise HarnessError(f"cannot plot the coefficients of run {run_id} ({src}): shape {mat.shape}")
    fig, ax = plt.subplots(figsize=(min(16, 2 + 0.12 * mat.shape[1]), 1.2 + 0.45 * mat.shape[0]))
    finite = np.abs(mat[np.isfinite(mat)])
    lim = float(finite.max()) if finite.size else 1.0
    im = ax.imshow(mat, aspect="auto", cmap="RdBu_r", vmin=-(lim or 1.0), vmax=lim or 1.0, interpolation="nearest")
    names = record.get("task_vectors")
    if not (isinstance(names, list) and len(names) == mat.shape[0]):
        names = [f"τ{i}" for i in range(mat.shape[0])]
    ax.set_yticks(range(mat.shape[0]), [str(n)[:40] for n in names])
    ax.set_xlabel("block (parameter tensor, in model order)")
    ax.set_title(f"{run_id[:80]}: learned coefficients λ")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    out_path = Path(out_path)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        _save(fig, out_path)
    except OSError as e:
        raise HarnessError(f"cannot write {out_path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return out_path


def html_page(board: pd.DataFrame, images: list[Path], title: str = "aTLAS harness leaderboard") -> str:
    """A self-contained HTML page: the leaderboard table and the PNGs inlined as data URIs."""
    from harness.leaderboards import format_board
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


def publish(board: pd.DataFrame, results_dir: str | Path, plots: bool = True, records=None, labels: dict | None = None,
            task: str | None = None, searcher: str | None = None, family_prefix: str | None = None) -> list[Path]:
    """Markdown + CSV and (with ``plots``) the curves PNGs and the self-contained HTML page, each
    written whole or not at all; returns the paths written. The curves take the same filters and
    records as the table. Raises OSError when the results folder cannot be written."""
    from harness.leaderboards import write
    paths = write(board, results_dir)
    if plots:
        pngs = plot_curves(results_dir, Path(results_dir) / "plots", task=task, searcher=searcher,
                           family_prefix=family_prefix, records=records, labels=labels)
        page = Path(results_dir) / "leaderboard.html"
        atomic_write(page, html_page(board, pngs))
        paths += pngs + [page]
    return paths


def show(board: pd.DataFrame, results_dir: str | Path, plots: bool = True, records=None, labels: dict | None = None,
         **filters) -> list[Path]:
    """Print the table (stdout) and publish it; each file written is named on stderr. Files that
    cannot be written (a read-only results folder, a full disk) are one warning line on stderr:
    the table stays printed, nothing recorded is touched."""
    from harness.leaderboards import board_text
    print(board_text(board))
    try:
        paths = publish(board, results_dir, plots=plots, records=records, labels=labels, **filters)
    except OSError as e:
        where = e.filename or results_dir
        print(f"warning: could not write the leaderboard files under {results_dir} ({where}: {e.strerror or e}); "
              "the table above is not saved", file=sys.stderr)
        return []
    for path in paths:
        print(f"wrote {path}", file=sys.stderr)
    return paths
