"""Does each fine-tuned checkpoint belong to its data set? A check run before a search composes them.

A pool of checkpoints where one data set's file is another's (a copy under the wrong name, two
files swapped) composes silently into a worse model. The check scores the pre-trained model and
every checkpoint on a small fixed subset of every data set's **validation** split (a table of
T + 1 rows by T columns) and asks two things of each checkpoint ``c``:

1. it beats the pre-trained model on ``c``'s own validation subset; a checkpoint that does not is
   a *failure*, and a run refuses to start unless told to trust the checkpoints
   (``--trust-checkpoints``, or ``ATLAS_HARNESS_TRUST_CHECKPOINTS=1``);
2. its gain over the pre-trained model is largest on ``c``'s own data set; a checkpoint that
   gains more elsewhere is a *warning* (related data sets such as digits can share gains).

A data set on which no model of the pool, pre-trained or fine-tuned, does better than always
answering the subset's most frequent class (by three standard errors) tells nothing about whose
checkpoint is whose: its checkpoint is left unjudged instead of refused.

Validation images only, never test: the check must not touch what the run reports. The subset is
the same for every run (seeded by the data set's name, not the run's seed), so the table is
computed when the source is built and kept in the same reference-cache entry as the source's
zero-shot and fine-tuned accuracies (:meth:`ModelSource.evaluate_references`, keyed by content
hashes of the weights, task vectors, heads and data and by the code). A run judges it in the
driver process before anything is searched (:mod:`harness.runner`); the Ray workers that build
the same source read it from that cache entry.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import os
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from harness.api import HarnessError
from harness.sources.base import ModelSource

SUBSET = 64          # validation images per data set: T·(T+1)·64 forward passes in all
SEED = 0             # the subset is fixed, not the run's seed: one cache entry serves every seed
CHUNK = 256          # images per forward pass
PRETRAINED = "pre-trained"
META_KEY = "checkpoint_check"
ENV_TRUST = "ATLAS_HARNESS_TRUST_CHECKPOINTS"
TRUST_HINT = "pass --trust-checkpoints to run anyway"
_TRUST: contextvars.ContextVar[bool] = contextvars.ContextVar("trust_checkpoints", default=False)


class CheckpointMismatch(HarnessError):
    """A run refused because a checkpoint does not beat the pre-trained model on its own data set."""


@contextlib.contextmanager
def trusting(on: bool = True):
    """Within this block a failed check is a warning, not a refusal (``--trust-checkpoints``)."""
    token = _TRUST.set(bool(on))
    try:
        yield
    finally:
        _TRUST.reset(token)


def trusted() -> bool:
    """Whether failed checks proceed: inside :func:`trusting`, or with ``$ATLAS_HARNESS_TRUST_CHECKPOINTS``
    set to 1/true/yes."""
    return _TRUST.get() or os.environ.get(ENV_TRUST, "").strip().lower() in ("1", "true", "yes")


def table_of(source) -> dict | None:
    """The check's table a source carries (``meta["checkpoint_check"]``), or None. Sources built
    from the user's checkpoint files carry one (``open_clip`` and ``hf_clip``); the built-in zoos,
    which fine-tune their own task vectors under their own names, do not."""
    meta = getattr(source, "meta", None)
    tab = meta.get(META_KEY) if isinstance(meta, dict) else None
    return tab if isinstance(tab, dict) and tab.get("datasets") else None


def checked_datasets(source: ModelSource) -> list[str]:
    """The data sets with a checkpoint and a validation split, in the source's order."""
    return [ds for ds in source.datasets if ds in source.task_vectors and "val" in source.inputs.get(ds, {})]


def subset_indices(n: int, ds: str, size: int = SUBSET) -> np.ndarray:
    """The sorted positions of ``ds``'s validation subset: at most ``size`` of ``n``, seeded by the name."""
    rng = np.random.default_rng([SEED, zlib.crc32(ds.encode())])
    return np.sort(rng.permutation(n)[:size])


@torch.no_grad()
def accuracy_table(source: ModelSource, size: int = SUBSET) -> dict:
    """``{"datasets", "sizes", "chance", "rows"}``: ``rows[model][ds]`` is the top-1 accuracy of the
    pre-trained model (row :data:`PRETRAINED`) and of each checkpoint on ``ds``'s validation
    subset; ``chance[ds]`` the share of the subset's most frequent class. One forward pass per
    model over every data set's subset together (in chunks), split per head afterwards."""
    names = checked_datasets(source)
    xs, ys = [], {}
    for ds in names:
        y = source.labels[ds]["val"]
        idx = subset_indices(len(y), ds, size)
        x = source.inputs[ds]["val"]
        xs.append(x[torch.as_tensor(idx, device=x.device)] if isinstance(x, torch.Tensor) else x[idx])
        ys[ds] = y[torch.as_tensor(idx, device=y.device)].to(source.device)
    same = len({tuple(x.shape[1:]) for x in xs}) <= 1 and len({x.dtype for x in xs}) <= 1
    groups = [torch.cat(xs).to(source.device)] if same and xs else [x.to(source.device) for x in xs]
    bounds = np.cumsum([0] + [len(ys[ds]) for ds in names])

    def scores(params) -> dict[str, float]:
        feats = [source.features(params, g[i:i + CHUNK]) for g in groups for i in range(0, len(g), CHUNK)]
        z = torch.cat(feats) if feats else None
        out = {}
        for j, ds in enumerate(names):
            if len(ys[ds]) == 0:
                out[ds] = float("nan")
                continue
            pred = source.head(z[bounds[j]:bounds[j + 1]], ds).argmax(1)
            out[ds] = float((pred == ys[ds]).float().mean()) if pred.device.type != "meta" else float("nan")
        return out

    rows = {PRETRAINED: scores(source.base)}
    for ds in names:
        rows[ds] = scores(source.finetuned(ds))
    chance = {}
    for ds in names:
        y = ys[ds].cpu() if ys[ds].device.type != "meta" else None
        chance[ds] = float(torch.bincount(y).max()) / len(y) if y is not None and len(y) else float("nan")
    return {"datasets": names, "sizes": {ds: len(ys[ds]) for ds in names}, "chance": chance, "rows": rows}


# How a source computes the check when it is built (:meth:`ModelSource.evaluate_references`):
# the figures are cached with the source's references, under a key that includes this version.
EXTRA = (META_KEY, f"subset={SUBSET},seed={SEED}", lambda source: accuracy_table(source))


# --------------------------------------------------------------------------- judging


@dataclass
class Verdict:
    """What the check says of one checkpoint: ``status`` is ``ok``, ``warn`` (gains more on another
    data set), ``fail`` (does not beat the pre-trained model on its own) or ``unjudged`` (no
    model of the pool beats chance on its data set)."""

    checkpoint: str
    own: float
    pretrained: float
    best: str          # the other data set where this checkpoint gains most ("" when there is none)
    best_gain: float   # its gain there
    status: str

    @property
    def gain(self) -> float:
        return self.own - self.pretrained

    def line(self) -> str:
        """One line with the figures, for a refusal or a warning."""
        c = self.checkpoint
        if self.status == "fail":
            text = (f"checkpoint '{c}' does not beat the pre-trained model on {c}'s validation split "
                    f"({self.own:.3f} vs {self.pretrained:.3f})")
            if self.best and self.best_gain > 0:
                return text + f", and gains most on {self.best} ({self.best_gain:+.2f}): is it {self.best}'s?"
            return text + ", and gains on no data set: is it fine-tuned?"
        if self.status == "warn":
            return (f"checkpoint '{c}' gains more on {self.best} ({self.best_gain:+.2f}) than on its own data set "
                    f"{c} ({self.gain:+.2f}): is it {self.best}'s?")
        if self.status == "unjudged":
            return f"checkpoint '{c}' is not judged: no model beats chance on {c}'s validation subset"
        return f"checkpoint '{c}' beats the pre-trained model on {c} ({self.own:.3f} vs {self.pretrained:.3f})"


def informative(tab: dict, ds: str) -> bool:
    """Whether some model of the pool beats always answering the most frequent class on ``ds``'s
    subset by three standard errors: only then do the figures say whose checkpoint is whose."""
    p, n = tab["chance"][ds], tab["sizes"][ds]
    if not n or not math.isfinite(p):
        return False
    bar = p + 3 * math.sqrt(max(p * (1 - p), 1e-12) / n)
    return any(row.get(ds, float("nan")) > bar for row in tab["rows"].values())


def judge(tab: dict) -> list[Verdict]:
    """One :class:`Verdict` per checkpoint of the table, in its order."""
    pre, out = tab["rows"][PRETRAINED], []
    for c in tab["datasets"]:
        row = tab["rows"][c]
        own, base = row[c], pre[c]
        others = {ds: row[ds] - pre[ds] for ds in tab["datasets"]
                  if ds != c and math.isfinite(row[ds] - pre[ds])}
        best = max(others, key=others.get) if others else ""
        best_gain = others.get(best, float("nan"))
        if not (math.isfinite(own) and math.isfinite(base)) or not informative(tab, c):
            status = "unjudged"
        elif own <= base and own < 1.0:
            status = "fail"
        elif best and best_gain > own - base:
            status = "warn"
        else:
            status = "ok"
        out.append(Verdict(c, own, base, best, best_gain, status))
    return out


def enforce(verdicts: list[Verdict], log, trust: bool | None = None) -> dict:
    """Raise :class:`CheckpointMismatch` (one line naming every failed checkpoint with its figures)
    unless ``trust`` (default: :func:`trusted`); log each warning, and each failure when trusted,
    as one ``warning:`` line. Returns a summary for the run's record."""
    trust = trusted() if trust is None else trust
    failed = [v for v in verdicts if v.status == "fail"]
    if failed and not trust:
        raise CheckpointMismatch("; ".join(v.line() for v in failed)
                                 + f" (python -m harness check-checkpoints with the same options prints the table; "
                                   f"{TRUST_HINT})")
    for v in verdicts:
        if v.status == "warn" or (v.status == "fail" and trust):
            log(f"warning: {v.line()}" + ("; proceeding (checkpoints trusted)" if v.status == "fail" else ""))
    return {"passed": not failed, "trusted": bool(failed and trust),
            "status": {v.checkpoint: v.status for v in verdicts}}


def format_table(tab: dict, verdicts: list[Verdict]) -> str:
    """The accuracy table (rows: pre-trained and each checkpoint; columns: data sets), each
    checkpoint's own cell in brackets, a status column, and a line per failure or warning."""
    names = tab["datasets"]
    status = {v.checkpoint: v.status for v in verdicts}
    width = max([len(PRETRAINED)] + [len(n) for n in names]) + 2
    cols = max(8, *(len(n) + 1 for n in names)) if names else 8
    head = " " * width + "".join(f"{n:>{cols}}" for n in names) + "  check"
    sizes = ", ".join(f"{n} {tab['sizes'][n]}" for n in names)
    lines = [f"validation accuracy on a fixed subset of at most {SUBSET} images per data set ({sizes})", head]
    for row_name, row in tab["rows"].items():
        cells = "".join(f"{(f'[{row[n]:.3f}]' if n == row_name else f'{row[n]:.3f}'):>{cols}}" for n in names)
        mark = "" if row_name == PRETRAINED else {"ok": "ok", "warn": "WARN", "fail": "FAIL",
                                                   "unjudged": "?"}[status[row_name]]
        lines.append(f"{row_name:<{width}}{cells}  {mark}")
    notes = [v for v in verdicts if v.status != "ok"]
    if notes:
        lines.append("")
        lines += [f"{v.status.upper()}: {v.line()}" for v in notes]
    return "\n".join(lines)
