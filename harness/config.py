"""Run configuration: one dataclass, filled from defaults, then a TOML file, then CLI flags.

Plugin options (``-s key=value`` for the searcher, ``-t key=value`` for the task) are parsed
against the plugin's ``Options`` dataclass, so a typo or a wrong type is an error naming the
valid keys instead of a silently ignored setting.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.api import HarnessError

# Fields that change how a run executes but not what it computes: left out of the run's identity,
# so the same search on 1 or 4 workers resumes and deduplicates as one run.
EXECUTION_FIELDS = ("workers", "address", "gpus_per_worker", "cpus_per_worker", "parallel",
                    "results_dir", "cache_dir", "quiet", "rerun", "resume", "device", "config")


# Options added after runs were recorded, with the value that reproduces those runs: at that value
# they are left out of the run key, so adding an option keeps every earlier run id (and resume).
NEUTRAL: dict[str, dict[str, Any]] = {"task_options": {
    "precision": "fp32", "eval_chunk": "auto", "prefix_cache": "auto",
    # Benchmark-data options at their defaults (runs recorded before they existed keep their ids).
    "extra_data": [], "suite": "", "data_convention": "", "val_rule": "", "prompts": "", "bench_subset": 0,
    "sharpen_mode": "temperature", "linearize": False, "lora_form": "dense",
    "select_vectors": 0, "select_by": "gradient"},
    "searcher_options": {"region": "box", "inner": "adam", "refresh": 1.0}}  # dfo-gn's region, solver, probes
# Options one task gained after runs of it were recorded, at the values that leave it unchanged:
# left out of that task's identity only (``few_shot`` has had ``l1`` from the start).
NEUTRAL_FOR_TASK: dict[str, dict[str, Any]] = {
    "addition": {"l1": 0.0, "l2": 0.0}, "negation": {"l1": 0.0, "l2": 0.0}, "tta": {"reliable": 0.0},
    "few_shot": {"adapter": "none", "adapter_mode": "sequential", "adapter_steps": 300, "adapter_lr": 1e-3,
                 "adapter_scale": 0.01, "tip_alpha": 1.0, "tip_beta": 5.5, "fraction": 0.0,
                 "tip_search": False, "lpp_solver": "adam"}}
# The same for searchers' options (``es``'s ``minibatch`` defaults to true and is not neutral).
NEUTRAL_FOR_SEARCHER: dict[str, dict[str, Any]] = {"dfo-gn": {"minibatch": False, "coarse": "per_layer", "coarse_rounds": 0}}


@dataclass
class RunConfig:
    """Everything that defines a run. ``None`` means "the plugin's default" until resolved."""

    task: str = "addition"
    searcher: str = "nevergrad"
    budget: int | None = None
    batch_size: int | None = None
    seed: int = 0
    space: str | None = None
    searcher_options: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)
    workers: int = 0
    address: str | None = None
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    parallel: str = "auto"
    device: str = "cpu"
    results_dir: str = "results"
    cache_dir: str | None = None
    quiet: bool = False
    rerun: bool = False
    resume: str | None = None
    config: str | None = None

    def identity(self) -> dict[str, Any]:
        """The fields that determine the result (used for the run id and deduplication)."""
        d = dataclasses.asdict(self)
        ident = {k: v for k, v in d.items() if k not in EXECUTION_FIELDS}
        if self.parallel == "async":  # pipelined: scores are told in the order they finish
            ident["parallel"] = "async"
        return ident

    def key(self) -> str:
        """A short stable hash of :meth:`identity` without the seed (seeds group in leaderboards).
        Options of :data:`NEUTRAL` at their neutral value are left out of it."""
        ident = {k: v for k, v in self.identity().items() if k != "seed"}
        for group, neutral in NEUTRAL.items():
            own = NEUTRAL_FOR_TASK.get(self.task, {}) if group == "task_options" else \
                NEUTRAL_FOR_SEARCHER.get(self.searcher, {})
            neutral = {**neutral, **own}
            ident[group] = {k: v for k, v in ident[group].items() if not (k in neutral and v == neutral[k])}
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:8]

    def run_id(self) -> str:
        return f"{self.task}-{self.searcher}-{self.key()}-s{self.seed}".replace(":", "_").replace("/", "_")


_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp, what: str) -> Any:
    """Convert ``value`` (a string from the CLI or a TOML value) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        errors = []
        for a in args:
            try:
                return coerce(value, a, what)
            except HarnessError as e:
                errors.append(str(e))
        raise HarnessError(errors[0] if errors else f"{what}: bad value {value!r}")
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (str,)
        items = value if isinstance(value, (list, tuple)) else [s for s in str(value).split(",") if s.strip()]
        out = [coerce(v.strip() if isinstance(v, str) else v, inner, what) for v in items]
        return out if origin is list else tuple(out)
    if tp is bool:
        if isinstance(value, bool):
            return value
        s = str(value).lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise HarnessError(f"{what} must be true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise HarnessError(f"{what} must be {_type_name(tp)}, got {value!r}")
        try:
            if tp is int:
                if isinstance(value, int):
                    return value
                text = str(value).strip()
                if re.fullmatch(r"[+-]?\d+", text):
                    return int(text)  # exact, however large (never through a float)
                f = float(text)
                if not math.isfinite(f) or f != int(f):
                    raise ValueError
                return int(f)
            f = float(value)
            if not math.isfinite(f):
                raise HarnessError(f"{what} must be a finite number, got {value!r}")
            return f
        except (TypeError, ValueError, OverflowError):
            raise HarnessError(f"{what} must be {_type_name(tp)}, got {value!r}") from None
    if tp is str:
        return str(value)
    if tp is Any:
        return value
    raise HarnessError(f"{what}: unsupported option type {tp}")


def parse_pairs(pairs: list[str] | None, flag: str) -> dict[str, str]:
    """``["a=1", "b=x"]`` → ``{"a": "1", "b": "x"}``; a pair without ``=``, or a key given twice,
    is an error."""
    out = {}
    for p in pairs or []:
        k, sep, v = p.partition("=")
        if not sep or not k.strip():
            raise HarnessError(f"{flag} expects key=value, got {p!r}")
        if k.strip() in out:
            raise HarnessError(f"{flag} {k.strip()} is given twice ({out[k.strip()]!r} and {v.strip()!r}); give it once")
        out[k.strip()] = v.strip()
    return out


def resolve_options(plugin_cls, given: dict[str, Any], kind: str, also: tuple = ()):
    """Build ``plugin_cls.Options`` from ``given``; unknown keys and bad values are errors (naming
    the valid ones, and ``also``: keys taken elsewhere, such as the searcher wrappers')."""
    fields = plugin_cls.option_fields()
    hints = typing.get_type_hints(plugin_cls.Options)
    unknown = sorted(set(given) - set(fields))
    if unknown:
        valid = ", ".join(fields) or "(this plugin takes no options)"
        if also:
            valid += f"; and the harness's: {', '.join(also)}"
        raise HarnessError(f"unknown {kind} option '{unknown[0]}' for {plugin_cls.name or plugin_cls.__name__}; valid: {valid}")
    kwargs = {k: coerce(v, hints[k], f"{kind} option '{k}'") for k, v in given.items()}
    return plugin_cls.Options(**kwargs)


def load_toml(path: str) -> dict[str, Any]:
    """Read a run config file; keys are the long flag names with ``_`` (e.g. ``batch_size``)."""
    p = Path(path)
    if not p.is_file():
        raise HarnessError(f"config file not found: {path}")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise HarnessError(f"config file {path} is not valid TOML: {e}") from None
    unknown = sorted(set(data) - set(_FIELDS) - {"config"})
    if unknown:
        raise HarnessError(f"unknown key '{unknown[0]}' in {path}; valid: {', '.join(k for k in _FIELDS if k != 'config')}")
    for k in ("searcher_options", "task_options"):
        if k in data and not isinstance(data[k], dict):
            raise HarnessError(f"'{k}' in {path} must be a table ([{k}])")
    return data


def build_config(flags: dict[str, Any]) -> RunConfig:
    """Merge defaults < preset (``flags['preset']``) < TOML file (``flags['config']``) < explicit
    flags (those not ``None``)."""
    values: dict[str, Any] = {}
    if flags.get("config"):
        values.update(load_toml(flags["config"]))
        values["config"] = flags["config"]
    for k, v in flags.items():
        if v is None or k not in _FIELDS:
            continue
        if k in ("searcher_options", "task_options"):
            values[k] = {**values.get(k, {}), **v}
        else:
            values[k] = v
    if flags.get("preset"):
        from harness.presets import apply
        values = apply(flags["preset"], values)
    hints = typing.get_type_hints(RunConfig)
    for k, v in list(values.items()):
        if k not in ("searcher_options", "task_options"):
            values[k] = coerce(v, hints[k], f"'{k}'")
    cfg = RunConfig(**values)
    check_config(cfg)
    return cfg


def check_config(cfg: RunConfig) -> None:
    """Values no run can have (one-line errors before anything is created)."""
    if not 0 <= cfg.seed < 2**32:
        raise HarnessError(f"--seed must be in 0..{2**32 - 1}, got {cfg.seed}")
    if cfg.space is not None and not str(cfg.space).strip():
        raise HarnessError("--space is empty; give per_task, per_layer, per_block or per_partition:K "
                           "(or leave it out for the searcher's default)")
    if not str(cfg.results_dir).strip():
        raise HarnessError("--results-dir is empty; give a folder (default: results)")
    if cfg.resume is not None and not str(cfg.resume).strip():
        raise HarnessError("--resume is empty; give the id of a recorded run (its folder under runs/)")
