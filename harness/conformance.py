"""The conformance suite, shipped inside the package: what every plugin promises, checked.

``python -m harness check-plugin NAME [-s k=v] [-t k=v]`` runs it on any installed plugin from any
directory; the project's own tests (``tests/test_conformance.py``) call the same functions. Each
check returns a :class:`Check`; a failed one says which promise was broken.

The bars (see ``docs/plugins.md``):

- searcher: on a 6-D quadratic (the built-in ``quadratic`` task, seed 0) within 300 evaluations, distance to
  the optimum < 0.15 and loss < 5% of the start's (a ``reference`` searcher: no worse than its
  start); never more evaluations than the budget, and exactly the budget unless it is a reference;
  never more candidates per ask than the batch size; candidates inside the box; the same trace and
  result for the same seed.
- task: a non-empty space with start inside the box; finite, deterministic losses; shard results
  that reduce exactly to the whole (where the task says it is shardable); finite gradients of the
  right shape; the headline metric in ``final``.
- source: a task composing it scores finite losses (its task vectors match θ0's blocks).
- engine: the losses and gradients of a plain merge + forward (``LocalEngine.weighted_ce``).
- transform: keeps blocks and shapes, leaves its inputs alone, same seed gives the same vectors.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import harness.registry as registry
from harness.api import Candidate, HarnessError
from harness.config import RunConfig, resolve_options

QUAD_DIM, QUAD_BUDGET = 6, 300
MAX_DISTANCE, MAX_LOSS_FRACTION = 0.15, 0.05


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


def drive(searcher, evaluate, budget: int, batch: int = 1):
    """Ask/tell in this process as the runner does, until ``budget`` evaluations are spent or the
    searcher asks for none; ``evaluate`` maps a list of candidates to their evaluations (e.g. a
    task's ``evaluate``). For a searcher's own unit tests. Returns the asked candidates, one list
    per ask, and the recommendation; the searcher is closed afterwards."""
    asked, used = [], 0
    try:
        while used < budget:
            cands = searcher.ask(min(batch, budget - used))
            if not cands:
                break
            asked.append(cands)
            searcher.tell(cands, evaluate(cands))
            used += len(cands)
        return asked, searcher.recommend()
    finally:
        searcher.close()


def _trace(results_dir: Path, rec: dict) -> list[dict]:
    from harness.results import RunStore
    return RunStore(results_dir, rec["run_id"]).trace(warn=False)


def _quadratic_run(workdir: Path, name: str, options: dict, seed=0, budget=QUAD_BUDGET, batch=None) -> dict:
    from harness.runner import run
    cfg = RunConfig(task="quadratic", searcher=name, budget=budget, batch_size=batch, seed=seed,
                    task_options={"dim": QUAD_DIM}, searcher_options=dict(options),
                    results_dir=str(workdir), quiet=True)
    return run(cfg, log=lambda m: None)


def check_searcher(name: str, options: dict | None = None, workdir: str | None = None) -> list[Check]:
    """Every promise of a searcher plugin, on the quadratic task."""
    options = options or {}
    cls = registry.load("searcher", name)
    out: list[Check] = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        rec = _quadratic_run(tmp / "optimum", name, options)
        start = rec["references"]["start (x = 0)"]["loss"]
        d, loss = rec["final"]["distance"], rec["final"]["loss"]
        if cls.reference:
            out.append(Check("no worse than its start (reference)", loss <= start + 1e-12,
                             f"loss {loss:.4g} vs start {start:.4g}"))
        else:
            out.append(Check(f"approaches the optimum of a {QUAD_DIM}-D quadratic in {QUAD_BUDGET} evaluations",
                             d < MAX_DISTANCE and loss < MAX_LOSS_FRACTION * start,
                             f"distance {d:.4f} (< {MAX_DISTANCE}), loss {loss:.4g} (< {MAX_LOSS_FRACTION} × start {start:.4g})"))
        batch, budget = min(4, cls.max_batch or 4), 23
        rec = _quadratic_run(tmp / "budget", name, options, budget=budget, batch=batch)
        rows = _trace(tmp / "budget", rec)
        ok = rec["evaluations"] == len(rows) <= budget and (cls.reference or len(rows) == budget)
        out.append(Check("spends the budget and no more", ok, f"{len(rows)} evaluations for a budget of {budget}"))
        sizes = _ask_sizes(cls, options, batch)
        out.append(Check("asks at most batch-size candidates, inside the box",
                         all(1 <= n <= batch for n, _ in sizes) and all(inside for _, inside in sizes),
                         f"asked {[n for n, _ in sizes]} for batch size {batch}"
                         + ("" if all(i for _, i in sizes) else "; a candidate outside the box")))
        a = _quadratic_run(tmp / "a", name, options, seed=3, budget=60)
        b = _quadratic_run(tmp / "b", name, options, seed=3, budget=60)
        same = a["final"] == b["final"] and [r["x"] for r in _trace(tmp / "a", a)] == [r["x"] for r in _trace(tmp / "b", b)]
        out.append(Check("same seed, same trace and result", same, "" if same else "two runs with seed 3 differ"))
    return out


def _ask_sizes(cls, options: dict, batch: int) -> list[tuple[int, bool]]:
    """(candidates per ask, all inside the box) over a few asks on the quadratic."""
    from harness.wrappers import Wrappers
    QuadraticTask = registry.load("task", "quadratic")  # by name: the harness never imports plugins
    task = QuadraticTask(QuadraticTask.Options(dim=5), seed=0)
    task.setup()
    space = task.space()
    own = {k: v for k, v in options.items() if k in cls.option_fields() or k not in Wrappers.option_fields()}
    s = cls(space, 12, batch, 0, resolve_options(cls, own, "searcher"))
    sizes = []
    try:
        for _ in range(3):
            cands = s.ask(batch)
            if not cands:
                break
            inside = all(np.all(c.x >= space.lower - 1e-9) and np.all(c.x <= space.upper + 1e-9) for c in cands)
            sizes.append((len(cands), inside))
            s.tell(cands, task.evaluate(cands))
    finally:
        s.close()
    return sizes


def check_task(name: str, options: dict | None = None, cache_dir: str | None = None,
               device: str = "cpu", space: str | None = None) -> list[Check]:
    """Every promise of a task plugin (the search objective and the final report)."""
    from harness.evaluators import reduce_shards
    cls = registry.load("task", name)
    opts = resolve_options(cls, dict(options or {}), "task")
    registry.validate("task", cls, opts)
    task = cls(opts, space=space or ("per_block" if cls.composes else "flat"), seed=0, cache_dir=cache_dir)
    task.setup(device)
    sp = task.space()
    out = [Check("a non-empty box with the start inside",
                 sp.dim >= 1 and bool(np.all(sp.lower < sp.upper)) and bool(np.all(sp.start >= sp.lower))
                 and bool(np.all(sp.start <= sp.upper)) and (sp.labels is None or len(sp.labels) == sp.dim),
                 f"dim {sp.dim}")]
    rng = np.random.default_rng(0)
    xs = [sp.start, rng.uniform(sp.lower, sp.upper) * 0.3]
    cands = [Candidate(x=x) for x in xs]
    evs = [task.complete(c, e) for c, e in zip(cands, task.evaluate(cands))]
    out.append(Check("finite losses", len(evs) == 2 and all(math.isfinite(e.loss) and e.ok for e in evs),
                     f"losses {[e.loss for e in evs]}"))
    again = task.complete(cands[1], task.evaluate([cands[1]])[0]).loss
    out.append(Check("deterministic losses", math.isclose(again, evs[1].loss, rel_tol=1e-6), f"{again} vs {evs[1].loss}"))
    parts = [task.evaluate([cands[1]], shard=(i, 2))[0] for i in range(2)]
    ok = all(math.isfinite(p.loss) for p in parts)
    if ok and type(task).shardable(task.options):
        whole = task.complete(cands[1], reduce_shards(parts)).loss
        ok = math.isclose(whole, evs[1].loss, rel_tol=1e-5, abs_tol=1e-6)
    out.append(Check("shards reduce to the whole", ok, f"shard losses {[p.loss for p in parts]}"))
    g = task.evaluate([Candidate(x=xs[1], grad=True, batch=0)])[0]
    out.append(Check("finite gradients of the space's shape",
                     g.grad is not None and g.grad.shape == (sp.dim,) and bool(np.all(np.isfinite(g.grad))),
                     "" if g.grad is None else f"shape {g.grad.shape}"))
    final = task.final(sp.start)
    out.append(Check("final metrics hold the headline", task.headline in final
                     and math.isfinite(final[task.headline]), f"{task.headline} in {sorted(final)}"))
    return out


def check_source(name: str, source_options: str = "", task_options: dict | None = None,
                 cache_dir: str | None = None) -> list[Check]:
    """A source plugin under task addition: it loads, every data set has a task vector shaped like θ0,
    and the addition task's promises hold on it."""
    import torch
    from harness.objective import resolve_source
    AdditionTask = registry.load("task", "addition")
    given = {"source": name, "source_options": source_options, **(task_options or {})}
    opts = resolve_options(AdditionTask, given, "task")
    registry.validate("task", AdditionTask, opts)
    cls, sopts = resolve_source(opts)
    src = cls.load(sopts, cache_dir=cache_dir, progress=False)
    bad = [ds for ds in src.datasets if list(src.task_vectors.get(ds, {})) != list(src.base)
           or any(src.task_vectors[ds][k].shape != src.base[k].shape for k in src.base)]
    out = [Check("two or more data sets, each with a task vector shaped like θ0", len(src.datasets) >= 2 and not bad,
                 f"data sets {src.datasets}; mismatched: {bad}"),
           Check("finite weights", all(torch.isfinite(v).all() for v in src.base.values())
                 and all(torch.isfinite(v).all() for tv in src.task_vectors.values() for v in tv.values())),
           Check("train, val and test splits with labels", all(
               len(src.inputs[ds][s]) == len(src.labels[ds][s]) > 0 for ds in src.datasets for s in ("train", "val", "test"))),
           Check("fine-tuned accuracies in meta", all(0 <= src.meta.get("finetuned_acc", {}).get(ds, -1) <= 1
                                                     for ds in src.datasets))]
    out += check_task("addition", {k: v for k, v in given.items() if k != "search_n"} | {"search_n": 32},
                      cache_dir=cache_dir, space="per_layer")
    return out


def check_engine(name: str, task_options: dict, cache_dir: str | None = None) -> list[Check]:
    """An engine plugin gives the losses, accuracies and gradients of one plain merge + forward per
    candidate, for batches and shards (of the linearised model, for engines of linearised models)."""
    AdditionTask = registry.load("task", "addition")
    lin = {"linearize": True} if getattr(registry.load("engine", name), "needs_linearized", False) else {}
    made = []
    for engine, extra in ((name, {}), ("local", {"population": "off"})):
        t = AdditionTask(resolve_options(AdditionTask, {**task_options, "engine": engine, **extra, **lin}, "task"),
                         space="per_block", seed=0, cache_dir=cache_dir)
        t.setup("cpu")
        made.append(t)
    task, ref = made
    rng = np.random.default_rng(0)
    cands = [Candidate(x=rng.uniform(-0.4, 0.4, task.space().dim)) for _ in range(5)]
    worst = 0.0
    for shard in (None, (0, 2)):
        got = task.engine.score(cands, task.search, shard)
        want = [ref.engine.weighted_ce(c, ref.search, shard) for c in cands]
        worst = max([worst] + [abs(a.loss - b.loss) / max(abs(b.loss), 1e-12) for a, b in zip(got, want)])
    g = task.engine.score([Candidate(x=cands[0].x, grad=True)], task.search)[0]
    g_ref = ref.engine.weighted_ce(Candidate(x=cands[0].x, grad=True), ref.search)
    return [Check("losses equal a plain merge + forward (batches and shards)", worst < 1e-5, f"worst relative gap {worst:.2g}"),
            Check("gradients equal a plain merge + forward", g.grad is not None
                  and bool(np.allclose(g.grad, g_ref.grad, rtol=1e-4, atol=1e-7)))]


def check_transform(name: str) -> list[Check]:
    """A transform plugin keeps the blocks and shapes, leaves its inputs alone, is a function of
    the seed (same seed, same vectors), and returns one name per vector."""
    import torch
    import harness.transforms as transforms
    gen = torch.Generator().manual_seed(0)
    tvs = [{"w": torch.randn(6, 4, generator=gen), "b": torch.randn(6, generator=gen),
            "conv": torch.randn(3, 2, 2, 2, generator=gen)} for _ in range(3)]
    before = [{k: v.clone() for k, v in tv.items()} for tv in tvs]
    t = transforms.load(name)
    out, names, info = t.apply(tvs, ["a", "b", "c"], 5)
    again, _, _ = t.apply(tvs, ["a", "b", "c"], 5)
    shapes = all(set(o) == set(tvs[0]) and all(o[k].shape == tvs[0][k].shape for k in o) for o in out)
    return [
        Check("one name per vector, at least one vector", len(out) == len(names) >= 1, f"{len(out)} vectors, names {names}"),
        Check("same blocks and shapes as the task vectors", shapes),
        Check("finite values", all(bool(torch.isfinite(v).all()) for o in out for v in o.values())),
        Check("inputs left unchanged", all(torch.equal(tv[k], b[k]) for tv, b in zip(tvs, before) for k in tv)),
        Check("same seed, same vectors", all(torch.equal(o[k], a[k]) for o, a in zip(out, again) for k in o)),
        Check("info is a dict", isinstance(info, dict)),
    ]


def check_plugin(name: str, kind: str | None = None, searcher_options: dict | None = None,
                 task_options: dict | None = None, cache_dir: str | None = None) -> tuple[str, list[Check]]:
    """``(kind, checks)`` for the plugin ``name`` (its kind found from the entry points unless given)."""
    kinds = [k for k in registry.GROUPS if name in registry.names(k)]
    if kind is None:
        if not kinds and ":" not in name:
            raise HarnessError(f"no installed plugin named '{name}'; `python -m harness list` shows them")
        if len(kinds) > 1:
            raise HarnessError(f"'{name}' is a {' and a '.join(kinds)}; say which with --kind")
        kind = kinds[0] if kinds else "searcher"
    task_options = dict(task_options or {})
    if kind == "searcher":
        return kind, check_searcher(name, searcher_options)
    if kind == "task":
        return kind, check_task(name, task_options, cache_dir)
    if kind == "transform":
        return kind, check_transform(name)
    if kind == "source":
        return kind, check_source(name, task_options.pop("source_options", ""), task_options, cache_dir)
    return kind, check_engine(name, task_options, cache_dir)
