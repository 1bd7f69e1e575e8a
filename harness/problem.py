"""A run config resolved against its plugins, and the task built from it.

The runner, the Ray workers and the benchmarks all build their task here, so "seed, make the
task, set it up" is written once and neither the runner nor the Ray evaluator imports the other.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

import harness.registry as registry
from harness.api import HarnessError, Searcher, Task
from harness.config import RunConfig, check_config, resolve_options
from harness.engines import check_device
from harness.evaluators import PARALLEL_MODES
from harness.wrappers import Wrappers, wrap


@dataclass
class Plan:
    """A run config resolved against its plugins: every default filled in, options typed."""

    config: RunConfig
    task_cls: type[Task]
    searcher_cls: type[Searcher]
    task_options: object
    searcher_options: object
    wrapper_options: object = None


def plan(cfg: RunConfig) -> Plan:
    """Check the config against the plugins and fill every default; raises HarnessError."""
    check_config(cfg)
    searcher_cls = registry.load("searcher", cfg.searcher)
    task_cls = registry.load("task", cfg.task)
    t_opts = resolve_options(task_cls, cfg.task_options, "task")
    bind_transform(searcher_cls, task_cls, t_opts)
    # Wrapper options (warm, screen, finalists) are the harness's, unless the searcher declares them.
    own = searcher_cls.option_fields()
    w_given = {k: v for k, v in cfg.searcher_options.items() if k in Wrappers.option_fields() and k not in own}
    s_given = {k: v for k, v in cfg.searcher_options.items() if k not in w_given}
    s_opts = resolve_options(searcher_cls, s_given, "searcher",
                             also=tuple(k for k in Wrappers.option_fields() if k not in own))
    registry.validate("searcher", searcher_cls, s_opts)
    w_opts = resolve_options(Wrappers, w_given, "searcher")
    Wrappers.validate(w_opts)
    if searcher_cls.needs_outputs and not task_cls.returns_outputs(t_opts):
        raise HarnessError(f"searcher '{cfg.searcher}' models the task's outputs, which task '{cfg.task}' does not "
                           "return with these options (addition with objective=ce, few_shot without a joint adapter, "
                           "negation; each without an l1/l2 term)")
    if searcher_cls.needs_outputs and getattr(s_opts, "minibatch", False) and not task_cls.minibatch_outputs:
        raise HarnessError(f"searcher option minibatch=true models the task's outputs on mini-batches, which task "
                           f"'{cfg.task}' returns only on its whole search set (tasks that return them: addition, "
                           "few_shot); set minibatch=false")
    if searcher_cls.needs_outputs and getattr(t_opts, "precision", "fp32") in ("bf16", "fp16"):
        raise HarnessError(f"searcher '{cfg.searcher}' models the task's outputs from differences of nearby "
                           f"candidates, which {t_opts.precision} rounding swamps; use -t precision=fp32")
    if w_opts.screen < 1 and (searcher_cls.needs_gradient or searcher_cls.reference or searcher_cls.needs_outputs):
        raise HarnessError(f"searcher option screen (multi-fidelity screening) is for black-box searchers, "
                           f"not {cfg.searcher}")
    defaults = Wrappers.Options()
    w_set = {k: v for k, v in dataclasses.asdict(w_opts).items() if v != getattr(defaults, k)}
    registry.validate("task", task_cls, t_opts)
    budget = cfg.budget if cfg.budget is not None else searcher_cls.budget_for(s_opts)
    batch = cfg.batch_size if cfg.batch_size is not None else searcher_cls.default_batch
    if budget < 1:
        raise HarnessError(f"--budget must be at least 1, got {budget}")
    if batch < 1:
        raise HarnessError(f"--batch-size must be at least 1, got {batch}")
    if searcher_cls.max_batch is not None and batch > searcher_cls.max_batch:
        raise HarnessError(f"searcher '{cfg.searcher}' takes at most {searcher_cls.max_batch} candidate(s) per batch, got --batch-size {batch}")
    if cfg.workers < 0:
        raise HarnessError(f"--workers must be 0 (local) or more, got {cfg.workers}")
    if str(cfg.device).startswith("cuda") and (cfg.workers or cfg.address) and cfg.gpus_per_worker <= 0:
        raise HarnessError(f"--device {cfg.device} with Ray workers needs --gpus-per-worker > 0: each worker "
                           "computes on the GPU Ray assigns it")
    check_device(cfg.device)  # the driver scores the final result on it
    if cfg.parallel not in PARALLEL_MODES:
        raise HarnessError(f"--parallel must be one of {', '.join(PARALLEL_MODES)}; got {cfg.parallel!r}")
    if cfg.parallel == "async":
        if not searcher_cls.asynchronous:
            ok = ", ".join(_asynchronous_searchers())
            raise HarnessError(f"--parallel async needs a searcher that takes scores in any order; '{cfg.searcher}' "
                               f"does not (asynchronous searchers: {ok})")
        if w_set:
            raise HarnessError(f"--parallel async does not combine with the searcher options {', '.join(sorted(w_set))} "
                               "(their stages wait for whole batches); use --parallel candidates")
    from harness.composition import parse_space  # every task: the space is part of the run's identity
    parse_space(cfg.space or searcher_cls.default_space)
    task_cls.check_space(t_opts, cfg.space or searcher_cls.default_space)
    resolved = dataclasses.replace(
        cfg, budget=budget, batch_size=batch, space=cfg.space or searcher_cls.default_space,
        task_options=dataclasses.asdict(t_opts), searcher_options={**dataclasses.asdict(s_opts), **w_set})
    return Plan(resolved, task_cls, searcher_cls, t_opts, s_opts, w_opts)


def _asynchronous_searchers() -> list[str]:
    """Names of the installed searchers that can run pipelined (a plugin that fails to load is left out)."""
    out = []
    for name in registry.names("searcher"):
        try:
            if getattr(registry.load("searcher", name), "asynchronous", False):
                out.append(name)
        except Exception:
            pass
    return out


def bind_transform(searcher_cls, task_cls, t_opts) -> None:
    """A baseline searcher (``ties``) composes its transform's vectors: set the task's ``transform``
    to it when none is given; a transform of another name is a one-line error."""
    want = searcher_cls.transform
    if not want or "transform" not in task_cls.option_fields():
        return
    given = t_opts.transform
    if not given:
        t_opts.transform = want
        return
    from harness.transforms import parse
    if parse(given)[0] != want:
        raise HarnessError(f"searcher '{searcher_cls.name}' merges '{want}' task vectors, but -t transform={given} "
                           f"names another transform; give -t transform={want}:key=value,... or leave it out")


def make_searcher(p: Plan, space) -> Searcher:
    """The plan's searcher on ``space``, inside the wrappers its options ask for (warm, screen)."""
    c = p.config
    factory = lambda sp, budget: p.searcher_cls(sp, budget, c.batch_size, c.seed, p.searcher_options)  # noqa: E731
    return wrap(factory, space, c.budget, p.wrapper_options or Wrappers.Options(), c.batch_size, c.seed)


def make_task(p: Plan) -> Task:
    c = p.config
    return p.task_cls(p.task_options, space=c.space, seed=c.seed, cache_dir=c.cache_dir)


def setup_task(task: Task, device: str) -> dict:
    """``task.setup`` then its ``after_setup`` hook; returns what the hook reports."""
    task.setup(device)
    return task.after_setup() or {}


def build_task(p: Plan, device: str | None = None) -> tuple[Task, dict]:
    """Seed, make the task and set it up on ``device`` (default: the run's), as every process that
    evaluates does (the runner, each Ray worker), so set-up draws the same random numbers."""
    seed = p.config.seed
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    task = make_task(p)
    return task, setup_task(task, device or p.config.device)
