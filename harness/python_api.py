"""The harness from Python: run, sweep, rank and reload runs, and compose task vectors yourself.

Everything here is what the command line does, with Python values in and out; ``harness``
re-exports these names (``import harness; harness.run(...)``). Runs are recorded under
``results_dir`` exactly as ``python -m harness run`` records them, so the CLI and Python see
the same runs, resume the same runs and rank them in the same leaderboards.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from harness.api import HarnessError


@dataclasses.dataclass
class Run:
    """One recorded run: its record (``record.json``) with the main facts as typed attributes;
    ``trace`` (one row per evaluation) and ``coefficients`` are read from disk when first used.

    Attributes:
        run_id: the run's id (its folder name under ``results_dir/runs``).
        status: ``complete``, ``running``, ``failed`` or ``interrupted``.
        task, searcher: plugin names; seed: the run's seed.
        headline: the task's main metric, ``score`` its value on the held-out split.
        final: every final metric; ``references``: zero-shot, task arithmetic, ... side by side.
        evaluations, wall_time_s: what the search cost.
        record: the whole record as a dict; path: the run's folder.
    """

    run_id: str
    status: str
    task: str
    searcher: str
    seed: int
    headline: str
    score: float | None
    final: dict
    references: dict
    evaluations: int
    wall_time_s: float
    record: dict
    path: Path

    @classmethod
    def from_record(cls, record: dict, path: str | Path) -> "Run":
        """The run recorded in ``record`` at folder ``path`` (made absolute, so a later change of
        the working directory still finds its trace). Only a complete run has a ``score``."""
        path = Path(path).resolve()
        try:
            final = dict(record.get("final") or {})
            headline = str(record.get("headline") or "")
            status = str(record.get("status") or "")
            return cls(run_id=path.name, status=status, task=str(record["task"]),
                       searcher=str(record["searcher"]), seed=int(record.get("seed") or 0), headline=headline,
                       score=final.get(headline) if status == "complete" else None, final=final,
                       references=dict(record.get("references") or {}),
                       evaluations=int(record.get("evaluations") or 0),
                       wall_time_s=float(record.get("wall_time_s") or 0.0), record=record, path=path)
        except (KeyError, TypeError, ValueError) as e:
            raise HarnessError(f"run record {path / 'record.json'} is damaged ({type(e).__name__}: {e}); "
                               "rerun the run (--rerun) to record it again") from None

    @functools.cached_property
    def trace(self):
        """Every evaluation as a pandas DataFrame, in the order they finished: ``i``, ``loss``,
        ``ok``, ``t`` (seconds into the run), ``best`` (best whole-set loss so far), ``batch``
        and ``fidelity`` (what the candidate was scored on), ``x`` (the coefficients, an array
        per row) and one ``metric/NAME`` column per metric the task reported."""
        import pandas as pd

        from harness.results import RunStore
        rows = RunStore(self.path.parent.parent, self.run_id).trace_rows()
        frame = pd.DataFrame([{"i": r.i, "loss": r.loss, "ok": r.ok, "t": r.t, "best": r.best, "batch": r.batch,
                               "fidelity": r.fidelity, "x": r.x, **{f"metric/{k}": v for k, v in r.metrics.items()}}
                              for r in rows])
        return frame if len(frame) else pd.DataFrame(columns=["i", "loss", "ok", "t", "best", "batch", "fidelity", "x"])

    @functools.cached_property
    def coefficients(self) -> dict:
        """The recommended coefficients as numpy arrays: ``x`` (the flat vector the searcher
        returned) and, for tasks that compose task vectors, ``coefficients`` (its expansion to
        one coefficient per task vector and block, shape (T, B) or (T, B, K)); empty for a run
        that ended before recommending."""
        from harness.results import load_coefficients
        if not self.record.get("coefficients"):
            return {}
        own = self.path / "coefficients.safetensors"  # (the record holds the path it was written at)
        path = own if own.is_file() else Path(self.record["coefficients"])
        return load_coefficients(str(path)) if path.is_file() else {}


def run(task: str | None = None, searcher: str | None = None, *, preset: str | None = None,
        budget: int | None = None, batch_size: int | None = None, seed: int | None = None,
        space: str | None = None, searcher_options: Mapping[str, Any] | None = None,
        task_options: Mapping[str, Any] | None = None, results_dir: str | Path = "results",
        cache_dir: str | None = None, workers: int | None = None, device: str | None = None,
        rerun: bool = False, trust_checkpoints: bool = False, quiet: bool = True,
        log: Callable[[str], None] | None = None) -> Run:
    """Run one search and record it, like ``python -m harness run``; return the :class:`Run`.

    Arguments mean what the flags of the same name mean (``searcher_options`` is ``-s``,
    ``task_options`` is ``-t``); ``None`` leaves the default (or the preset's value): task
    ``addition``, searcher ``nevergrad``. A run that
    is already complete is returned without running again unless ``rerun``; an interrupted one
    is resumed. Bad input raises :class:`harness.HarnessError` before anything is recorded.
    ``trust_checkpoints`` runs even when one of your checkpoints fails the checkpoint–task check
    (``--trust-checkpoints``). ``log`` receives progress lines (default: none).
    """
    import harness.sources.task_check as task_check
    from harness.config import build_config
    from harness.runner import run as run_config
    results_dir = "results" if results_dir is None else results_dir
    searcher_options, task_options = _mapping("searcher_options", searcher_options), _mapping("task_options",
                                                                                              task_options)
    flags = {"task": task, "searcher": searcher, "preset": preset, "budget": budget, "batch_size": batch_size,
             "seed": seed, "space": space, "results_dir": str(results_dir), "cache_dir": cache_dir,
             "workers": workers, "device": device, "rerun": rerun or None, "quiet": quiet,
             "searcher_options": dict(searcher_options or {}) or None,
             "task_options": dict(task_options or {}) or None}
    with task_check.trusting(trust_checkpoints):
        record = run_config(build_config(flags), log=log or (lambda _m: None))
    return Run.from_record(record, Path(results_dir) / "runs" / record["run_id"])


def _mapping(what: str, value) -> dict:
    """``value`` as a dict of options (None: none), or a one-line error naming ``what``."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise HarnessError(f"{what} must be a mapping of option name to value (a dict), got {type(value).__name__}")
    return dict(value)


def sweep(tasks: Sequence[str] | None = None, searchers: Sequence[str | Mapping[str, Any]] | None = None,
          seeds: Iterable[int] | None = None, *, file: str | Path | None = None,
          task_options: Mapping[str, Any] | None = None, results_dir: str | Path | None = None,
          cache_dir: str | None = None, workers: int | None = None, device: str | None = None,
          trust_checkpoints: bool = False, quiet: bool = True, log: Callable[[str], None] | None = None):
    """Run searchers × tasks × seeds, skipping runs already recorded, like ``python -m harness
    sweep``; return the sweep's leaderboard (a pandas DataFrame, as :func:`leaderboard`).

    ``searchers`` are names or tables with the keys of a sweep file's ``[[searchers]]`` entry
    (``name``, ``label``, ``budget``, ``space``, ``options``, ``task_options``). With ``file``,
    the sweep file is read first and the arguments given here replace its values. Every run is
    checked against the plugins before the first one starts. ``trust_checkpoints`` as for :func:`run`.
    """
    import harness.sources.task_check as task_check
    from harness.sweeps import read_sweep_file, run_sweep
    spec: dict[str, Any] = {"seeds": [0, 1], "tasks": [], "searchers": [], "results_dir": "results",
                            "cache_dir": None, "task_options": {}, "workers": 0, "quiet": quiet, "device": "cpu"}
    if file is not None:
        spec.update(read_sweep_file(str(file)))
    import numbers

    from harness.sweeps import check_sweep

    def listed(v):  # a list, tuple, range or generator as a list; anything else as given (check_sweep says)
        return list(v) if isinstance(v, Iterable) and not isinstance(v, (str, bytes, Mapping)) else v
    given: dict[str, Any] = {}
    if tasks is not None:
        given["tasks"] = listed(tasks)
    if searchers is not None:
        given["searchers"] = listed(searchers)
        if isinstance(given["searchers"], list):
            given["searchers"] = [{"name": s} if isinstance(s, str) else dict(s) if isinstance(s, Mapping) else s
                                  for s in given["searchers"]]
    if seeds is not None:
        given["seeds"] = listed(seeds)
        if isinstance(given["seeds"], list):
            given["seeds"] = [int(s) if isinstance(s, numbers.Integral) and not isinstance(s, bool) else s
                              for s in given["seeds"]]
    check_sweep(given, "harness.sweep's arguments")
    spec.update(given)
    spec["task_options"] = {**spec["task_options"], **_mapping("task_options", task_options)}
    for key, value in (("results_dir", results_dir), ("cache_dir", cache_dir), ("workers", workers),
                       ("device", device)):
        if value is not None:
            spec[key] = str(value) if key == "results_dir" else value
    if not spec["tasks"] or not spec["searchers"]:
        raise HarnessError("a sweep needs tasks and searchers (or a file that names them)")
    with task_check.trusting(trust_checkpoints):
        return run_sweep(spec, log=log or (lambda _m: None))


def leaderboard(results_dir: str | Path = "results", *, task: str | None = None, searcher: str | None = None,
                family: str | None = None):
    """Rank the complete runs under ``results_dir``, like ``python -m harness leaderboard``:
    one row per task × searcher setting × checkpoint family, with the mean, standard deviation
    and number of seeds of the task's headline metric, the cost, and the rank within the task.
    Returns a pandas DataFrame (empty, with the columns, when nothing is recorded)."""
    from harness.leaderboards import leaderboard as board
    return board("results" if results_dir is None else results_dir, task=task, searcher=searcher, family_prefix=family)


def load_run(run_id: str, results_dir: str | Path = "results") -> Run:
    """The recorded run ``run_id`` (any status), with its trace and coefficients."""
    from harness.results import RunStore, check_run_id
    if not isinstance(run_id, str):
        raise HarnessError(f"run_id must be a string (a folder name under runs/), got {type(run_id).__name__}")
    results_dir = "results" if results_dir is None else results_dir
    store = RunStore(results_dir, check_run_id(run_id))
    record = store.record()
    if record is None:
        raise HarnessError(f"no recorded run '{run_id}' under {results_dir}/runs")
    return Run.from_record(record, store.dir)


def compose(base: Mapping[str, Any], task_vectors: Mapping[str, Mapping[str, Any]], coefficients,
            space: str = "per_block") -> dict:
    """θ0 + Σ_t λ_t ⊙ τ_t as a state dict, for users who bring their own training or evaluation loop.

    The sum is computed in fp32; every entry is returned in the dtype and on the device of its
    ``base`` entry, so the result loads into the model ``base`` came from.

    Args:
        base: the pre-trained state dict (torch tensors); entries that are not floating point
            (counters, integer buffers) are copied unchanged.
        task_vectors: task name → state dict of differences to ``base`` (floating entries only),
            e.g. made with :func:`task_vector`.
        coefficients: one number for every coefficient (task arithmetic with α), a flat array of
            the space's size (what a run recommends: ``load_run(...).coefficients["x"]``), or a
            dict task name → number or per-block array.
        space: ``per_task``, ``per_layer``, ``per_block`` (the paper's anisotropic scaling) or
            ``per_partition:K``; a flat array must be in this space.
    """
    import numpy as np

    from harness.composition import Composition
    if str(space).split(":")[0] not in ("per_task", "per_layer", "per_block", "per_partition"):
        raise HarnessError(f"compose takes the space per_task, per_layer, per_block or per_partition:K, got {space!r}")
    _state_dict("base", base)
    if not isinstance(task_vectors, Mapping):
        raise HarnessError(f"task_vectors must be a dict of task name to state dict, got {type(task_vectors).__name__}")
    for n, tv in task_vectors.items():
        _state_dict(f"task vector '{n}'", tv)
    names = list(task_vectors)
    comp = Composition(dict(base), [dict(task_vectors[n]) for n in names], names, space=space)
    if hasattr(coefficients, "detach"):  # a torch tensor (also one that requires grad)
        coefficients = coefficients.detach().cpu().numpy()
    if isinstance(coefficients, Mapping):
        if set(coefficients) != set(names):
            raise HarnessError(f"coefficients must name every task vector ({', '.join(names)}); "
                               f"got {', '.join(map(str, coefficients))}")
        per = comp.dim // len(names)  # the flat vector is task-major: one run of `per` per task
        rows = []
        for n in names:
            v = _numbers(f"the coefficients of '{n}'", coefficients[n]).reshape(-1)
            v = np.full(per, v.item()) if v.size == 1 else v
            if v.size != per:
                raise HarnessError(f"space {space} has {per} coefficients per task vector; "
                                   f"task '{n}' got {v.size}")
            rows.append(v)
        x = np.concatenate(rows)
    else:
        x = _numbers("coefficients", coefficients)
        if x.ndim == 0:
            x = np.full(comp.dim, float(x))
        if x.shape != (comp.dim,):
            raise HarnessError(f"space {space} over {len(names)} task vectors has {comp.dim} coefficients, "
                               f"got an array of shape {tuple(x.shape)}")
    merged = comp.merge(x)
    # The merge runs in fp32; each entry comes back in its base entry's dtype and device.
    return {k: merged[k].to(dtype=v.dtype, device=v.device) if k in merged else v for k, v in base.items()}


def task_vector(base: Mapping[str, Any], finetuned: Mapping[str, Any]) -> dict:
    """τ = θ_finetuned − θ0 over the floating entries of ``base`` (both state dicts of torch tensors)."""
    from harness.composition import task_vector as tv
    return tv(_state_dict("base", base), _state_dict("finetuned", finetuned))


def _state_dict(what: str, sd) -> dict:
    """``sd`` as a dict of torch tensors, or a one-line error naming the first entry that is not one."""
    import torch
    if not isinstance(sd, Mapping):
        raise HarnessError(f"{what} must be a state dict (a dict of name to torch tensor), got {type(sd).__name__}")
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise HarnessError(f"{what}: entry '{k}' must be a torch tensor, got {type(v).__name__}")
    return dict(sd)


def _numbers(what: str, value):
    """``value`` as a float64 array of finite numbers, or a one-line error."""
    import numpy as np
    try:
        x = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise HarnessError(f"{what} must be numbers, got {value!r}") from None
    if not np.isfinite(x).all():
        raise HarnessError(f"{what} must be finite numbers, got {value!r}")
    return x
