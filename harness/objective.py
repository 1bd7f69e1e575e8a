"""What the composing tasks (objectives) share: choosing a model source and an engine, composing
the source's task vectors, fixed seeded subsets of the data, and the search-set container.

A composing task never builds a model. ``setup`` asks the source plugin for a
:class:`harness.sources.ModelSource` (``-t source=NAME``), composes the task vectors the
objective wants (with their signs), and hands both to an engine (``-t engine=NAME``), which
merges and runs the forward pass on the run's device. The task keeps what is objective: the data
sets and splits, the per-sample loss, the final metrics and the references.

The search objective of every composing task is a *weighted mean of per-sample losses*: each
sample carries a weight so that each data set counts equally, the weights sum to 1 over the
search set, and the loss of a shard is the weighted mean over its samples. Shard losses (and
gradients) therefore reduce exactly to the whole-set loss, and the loss is comparable across
searchers.
"""
from __future__ import annotations

import os
import sys
import typing
from dataclasses import dataclass

import numpy as np
import torch

import harness.registry as registry
from harness.api import HarnessError, Space, Task, option
from harness.composition import Composition, parse_space
from harness.config import resolve_options
from harness.sources.base import content_hash, data_hash

# Task options forwarded to the source / the engine when their Options have a field of that name.
SOURCE_FIELDS = ("model", "pretrained", "checkpoints", "data_root", "extra_data", "suite", "data_convention", "val_rule",
                 "prompts", "bench_subset")
ENGINE_FIELDS = ("population", "precision", "eval_chunk")


@dataclass
class ComposeOptions:
    """Options every composing task takes.

    ``source`` names the model source plugin (``effnet``, the default; ``tiny-clip``;
    ``open_clip``, chosen by itself when ``checkpoints`` are given; or any installed one) and
    ``source_options`` its own options as ``"key=value;key=value"``. ``model``, ``pretrained``,
    ``checkpoints`` and ``data_root`` go to sources that take them (your own open_clip model), and
    so do the benchmark-data options ``suite``, ``data_convention``, ``val_rule``, ``prompts`` and
    ``bench_subset`` (:class:`harness.sources.open_clip.BenchOptions`). The source declares and
    checks their valid values; empty here means the source's own default.

    ``engine`` names the engine plugin (``local``); ``population`` (``auto`` or ``off``) is its
    choice of vmap evaluation for batches of candidates, and ``precision`` (``fp32``, ``bf16`` or
    ``fp16``) the autocast of its forward, used only where it stays within a tolerance of fp32;
    ``eval_chunk`` (``auto`` or N) the images per forward pass (sized to the GPU's memory on CUDA).
    The engine declares and checks their valid values.

    ``select=b`` (b ≥ 1) keeps only the ``b`` most informative task vectors per block, ranked by
    |∂L/∂λ| at the start point before any search (informative block selection, paper App. D.6;
    needs ``--space per_block`` or ``per_partition:K``); 0 keeps them all.

    ``transform=NAME[:key=value,...]`` rewrites the task vectors before they are composed
    (``ties``, ``dare``, ``iso``; see ``python -m harness list transform``); it is recorded in its
    canonical form (non-default options only) and is part of the run's identity.
    """

    source: str = option("", "model source plugin (empty: effnet, or open_clip / hf_clip when checkpoints are given)")
    source_options: str = option("", "the source's own options, \"key=value;key=value\" (python -m harness list SOURCE)")
    model: str = option("", "open_clip architecture of your model, e.g. ViT-B-32 (source open_clip)")
    pretrained: str = option("", "your pre-trained weights: a file, local-dir:DIR, or a Hugging Face CLIPModel folder")
    checkpoints: list[str] = option(help="fine-tuned checkpoints, one per data set: NAME=PATH,... (or files/folders named after their data sets)",
                                    default_factory=list)
    data_root: str = option("", "image folders DIR/<data set>/<split>/<class>/, or benchmark data sets in their own layouts")
    extra_data: list[str] = option(help="data sets loaded without a checkpoint (heads and data only), e.g. negation's control",
                                   default_factory=list)
    suite: str = option("", "benchmark suite: ta8, ta8-atlas, tall14, tall20, atlas22 (needs --data-root; empty: none)")
    data_convention: str = option("", "benchmark data layout: auto, tv, hf or folders (empty: the source's default, auto)")
    val_rule: str = option("", "validation split of train: atlas (at most 5,000) or fusionbench (no cap) (empty: atlas)")
    prompts: str = option("", "class names and templates: atlas or fusionbench (empty: atlas)")
    bench_subset: int = option(0, "score benchmark val/test on a seeded subset of at most N images (0: all)")
    engine: str = option("local", "engine plugin that merges the weights and runs the forward pass")
    bound: float = option(1.5, "searchers keep every coefficient in [-bound, bound]", gt=0)
    dtype: str = option("fp32", "storage precision of the stacked task vectors", choices=("fp32", "fp16"))
    select: int = option(0, "keep the b most informative task vectors per block, by |dL/dλ| at the start "
                            "(needs --space per_block or per_partition:K; 0: keep all)", ge=0)
    population: str = option("auto", "engine's vmap evaluation of a batch of candidates: auto or off")
    precision: str = option("fp32", "engine's forward precision: fp32, or bf16/fp16 autocast, used only where it "
                                    "stays within a tolerance of fp32")
    eval_chunk: str = option("auto", "images per forward pass: auto (the source's own on CPU, sized to free memory "
                                     "on CUDA) or N")
    transform: str = option("", "rewrite the task vectors before composing: NAME[:key=value,...] with NAME ties, "
                                "dare or iso (empty: none)")
    linearize: bool = option(False, "score the first-order Taylor expansion of the model at the pre-trained weights, "
                                    "f(x;θ0) + J·Δθ (linearised task vectors; references are the linearised fine-tuned models)")


def source_name(options) -> str:
    """The source plugin a task's options pick: ``source``, else ``hf_clip`` when ``pretrained`` is
    a Hugging Face folder (it has a config.json), ``open_clip`` when checkpoints are given, else effnet."""
    if options.source:
        return options.source
    if options.checkpoints:
        hf = options.pretrained and os.path.isfile(os.path.join(options.pretrained, "config.json"))
        return "hf_clip" if hf else "open_clip"
    return "effnet"


def _pairs(spec: str, what: str) -> dict[str, str]:
    out = {}
    for pair in [p for p in spec.split(";") if p.strip()]:
        k, sep, v = pair.partition("=")
        if not sep or not k.strip():
            raise HarnessError(f"bad {what} {pair!r}: expected key=value;key=value")
        out[k.strip()] = v.strip()
    return out


def resolve_source(options):
    """``(source class, its typed Options)`` for a task's options; raises HarnessError."""
    cls = registry.load("source", source_name(options))
    given = _pairs(options.source_options, f"source option for '{cls.name}'")
    fields = cls.option_fields()
    for k in SOURCE_FIELDS:
        value = getattr(options, k, None)
        if not value:
            continue
        if k not in fields:
            raise HarnessError(f"task option {k} is for sources that load your files (open_clip); "
                               f"source '{cls.name}' does not take it")
        given[k] = value
    opts = resolve_options(cls, given, f"source '{cls.name}'")
    registry.validate("source", cls, opts)
    return cls, opts


def resolve_engine(options):
    """``(engine class, its typed Options)`` for a task's options; raises HarnessError."""
    cls = registry.load("engine", options.engine)
    fields = cls.option_fields()
    given = {k: getattr(options, k) for k in ENGINE_FIELDS if k in fields}
    opts = resolve_options(cls, given, f"engine '{cls.name}'")
    registry.validate("engine", cls, opts)
    return cls, opts


class ComposingTask(Task):
    """Base class of the objectives that compose a source's task vectors. Subclasses implement
    :meth:`prepare` (pick data sets, call :meth:`compose`, build search sets on the CPU) and the
    loss; :meth:`setup` then moves the engine and the task's own tensors to the run's device."""

    composes: typing.ClassVar[bool] = True

    def prepare(self) -> None:
        """Build the composition and the search data, on the CPU (subclasses)."""
        raise NotImplementedError

    def setup(self, device: str = "cpu") -> None:
        self.prepare()
        self.engine.to(device)
        for k, v in list(vars(self).items()):
            if k not in ("source", "comp", "engine", "options", "task_info", "transform_info"):
                setattr(self, k, _to(v, self.engine.device))

    def load_source(self):
        cls, opts = resolve_source(self.options)
        self.source = cls.load(opts, cache_dir=self.cache_dir, progress=True)
        check_finite(self.source, source_name(self.options))
        tangent = self.source.meta.get("fine_tuning") == "linear"
        if self.options.linearize:
            from harness.sources.linear import linearized
            self.source = linearized(self.source, self.cache_dir)
        elif tangent:
            print(f"warning: the task vectors of {self.source_name} were fine-tuned in the tangent space; they are "
                  f"meant for a linearised model (-t linearize=true)", file=sys.stderr)
        return self.source

    def provenance(self) -> dict:
        """The source and engine plugins this task used, and the checkpoint family: the same method
        moves by points between families, so a record says which pre-trained weights and which task
        vectors it composed. Hashed here, in the runner only, not in every process that evaluates."""
        src = self.source
        family = {"pretrained": content_hash(src.base),
                  "task_vectors": content_hash({f"{ds}/{k}": v for ds in sorted(src.task_vectors)
                                                for k, v in src.task_vectors[ds].items()}),
                  "data": data_hash(src)}
        if src.meta.get("data"):  # benchmark data sets: the suite, each set's convention and fingerprint
            from harness.data.paper import architecture
            family["benchmark"] = {"suite": getattr(self.options, "suite", "") or None,
                                   "architecture": architecture(src.base), "datasets": src.meta["data"]}
        return {"source": registry.provenance("source", source_name(self.options)),
                "engine": registry.provenance("engine", self.options.engine), "family": family}

    @property
    def source_name(self) -> str:
        return f"source '{source_name(self.options)}'"

    def check_datasets(self, names, what="data set"):
        missing = [d for d in names if d not in self.source.datasets]
        if missing:
            raise HarnessError(f"{what} '{missing[0]}' is not in {self.source_name}; "
                               f"valid: {', '.join(self.source.datasets)}")

    def compose_others(self, target: str):
        """Check ``target`` and compose every *other* data set's task vector (few-shot, TTA)."""
        self.check_datasets([target], "target")
        others = [d for d in self.source.datasets if d != target and d in self.source.task_vectors]
        if not others:
            raise HarnessError(f"{self.name} composes the other data sets' task vectors, "
                               f"but {self.source_name} has only '{target}'")
        return self.compose(others)

    def compose(self, names: list[str], signs: list[float] | None = None):
        """The composition of these data sets' task vectors in the run's space, and its engine
        (on the CPU until :meth:`setup` moves it)."""
        parse_space(self.space_kind)
        signs = signs or [1.0] * len(names)
        # Signed views: a sign of +1 shares the source's tensors (no copy of every task vector).
        tvs = [dict(self.source.task_vectors[d]) if s == 1 else {k: s * v for k, v in self.source.task_vectors[d].items()}
               for d, s in zip(names, signs)]
        if self.options.transform:
            import harness.transforms as transforms
            tvs, names, info = transforms.load(self.options.transform).apply(tvs, list(names), self.seed)
            self.transform_info = {"transform": self.options.transform, **info}
        dtype = {"fp32": torch.float32, "fp16": torch.float16}[self.options.dtype]
        self.comp = Composition(self.source.base, tvs, names, space=self.space_kind, dtype=dtype, seed=self.seed)
        cls, opts = resolve_engine(self.options)
        self.engine = cls(self.source, self.comp, "cpu", opts)
        self.task_info = self.engine.info  # what the engine chooses is recorded with the run
        if self.options.transform:
            self.task_info["transform"] = self.transform_info
        return self.comp

    def ta_label(self, alpha: float) -> str:
        """The task-arithmetic reference's name: over the transformed vectors when there is a transform."""
        over = f" over {self.options.transform}" if self.options.transform else ""
        return f"task arithmetic{over} (α={alpha:.2f})"

    @classmethod
    def validate(cls, options):
        """Cheap checks before anything is built or recorded (files exist, the source and engine
        accept their options); choices and bounds are checked from the declarations before this."""
        if options.data_root and not options.checkpoints:
            raise HarnessError("data_root (--data-root) is for your own model: give checkpoints too "
                               "(-t checkpoints=NAME=PATH,...); the built-in zoos use the built-in data")
        _, src = resolve_source(options)
        for k in SOURCE_FIELDS:  # normalised by the source (absolute paths, NAME=PATH pairs)
            if getattr(options, k, None) and hasattr(src, k):
                setattr(options, k, getattr(src, k))
        engine, _ = resolve_engine(options)
        if getattr(engine, "needs_linearized", False) and not options.linearize:
            raise HarnessError(f"engine {engine.name} scores linearised models only: add -t linearize=true "
                               f"(or use -t engine=local)")
        if options.transform:
            import harness.transforms as transforms
            options.transform = transforms.canonical(options.transform)

    # Whether --space norms (norm-layer tuning, no task vector) is a baseline of this task.
    tunes_norms = False

    @classmethod
    def check_space(cls, options, space: str) -> None:
        if space == "norms" and not cls.tunes_norms:
            raise HarnessError(f"--space norms (norm-layer tuning) is a test-time adaptation baseline: use it with "
                               f"--task tta, not {cls.name}")
        if options.select and not space.startswith(("per_block", "per_partition")):
            raise HarnessError(f"task option select (informative block selection) needs --space per_block or "
                               f"per_partition:K, not {space}")

    def after_setup(self) -> dict:
        if not self.options.select:
            return {}
        from harness.selection import select_informative
        rep = select_informative(self, min(self.options.select, self.comp.T))
        return {"selection": rep}

    def space(self) -> Space:
        b = self.options.bound
        return Space(dim=self.comp.dim, lower=-b, upper=b, labels=list(self.comp.labels), kind=self.comp.space)

    def expand(self, x):
        """Per-(task vector, block) coefficients of ``x`` (for records and heat maps)."""
        return self.comp.expand(np.asarray(x, dtype=np.float32))

    def task_vector_names(self) -> list[str] | None:
        return list(self.comp.task_names) if getattr(self, "comp", None) is not None else None

    def setup_facts(self) -> dict:
        """What the source reports about its setup: whether its zero-shot/fine-tuned accuracies
        and its zero-shot heads came from the reference cache, the inputs it holds in memory and
        how, and the splits it streams from disk instead."""
        meta = getattr(getattr(self, "source", None), "meta", None) or {}
        facts = {}
        if "references_cached" in meta:
            facts["source_references_cached"] = meta["references_cached"]
        if "heads_cached" in meta:
            facts["heads_cached"] = meta["heads_cached"]
        if "resident_inputs_mb" in meta:
            facts.update(resident_inputs_mb=meta["resident_inputs_mb"], input_dtype=meta.get("input_dtype"))
            if meta.get("streamed_splits"):
                facts.update(streamed_splits=meta["streamed_splits"], streamed_inputs_mb=meta["streamed_inputs_mb"])
        return facts

    def subset(self, ds: str, split: str, n: int, salt: int = 0) -> torch.Tensor:
        """A fixed random subset of ``n`` indices of a split (all of it if n <= 0), seeded by the run."""
        return self.pick(len(self.source.labels[ds][split]), n, salt)

    def pick(self, size: int, n: int, salt: int = 0) -> torch.Tensor:
        """A fixed random subset of ``n`` of ``size`` indices (all if n <= 0), seeded by the run."""
        if n <= 0 or n >= size:
            return torch.arange(size)
        gen = torch.Generator().manual_seed(self.seed * 7919 + salt)
        return torch.randperm(size, generator=gen)[:n].sort().values

    @staticmethod
    def minibatch(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
        """The mini-batch sampler of every composing task: ``min(k, n)`` distinct indices of
        ``range(n)``, drawn with ``generator``. Without replacement, as a shuffled DataLoader
        draws a batch in the paper's training loop: no sample counts twice in one step's loss,
        and the estimate has less variance than drawing with replacement."""
        return torch.randperm(n, generator=generator)[:min(k, n)]

    @staticmethod
    def penalty(l1: float = 0.0, l2: float = 0.0):
        """The coefficient penalty ``l1 × mean|λ| + l2 × mean λ²`` over the flat coefficient vector
        (a function of the coefficient tensor, added to a search loss), or None when both are 0."""
        if not (l1 or l2):
            return None
        return lambda xt: l1 * xt.abs().mean() + l2 * xt.square().mean()

    def params(self, x, grad: bool):
        """Merged parameters for ``x`` on the engine's device (see :meth:`Engine.params`)."""
        return self.engine.params(x, grad)

    def accuracy(self, x, ds: str, split: str = "test") -> float:
        return self.engine.accuracy(x, ds, split)


def check_finite(src, name: str) -> None:
    """A one-line HarnessError naming the data set's checkpoint and the block where θ0 or a task
    vector holds NaN or inf: one such value would poison every merged model and every score."""
    files = dict(zip(src.datasets, src.meta.get("checkpoints") or []))
    for k, v in src.base.items():
        if not torch.isfinite(v).all():
            where = src.meta.get("pretrained") or f"source '{name}'"
            raise HarnessError(f"the pre-trained weights ({where}) hold non-finite values in block '{k}'")
    for ds, tv in src.task_vectors.items():
        for k, v in tv.items():
            if not torch.isfinite(v).all():
                where = files.get(ds) or f"source '{name}'"
                raise HarnessError(f"the checkpoint of '{ds}' ({where}) holds non-finite values in block '{k}'")


def _to(value, device):
    """``value`` with every tensor in it (also inside lists, tuples, dicts, WeightedSets) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, WeightedSet):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        moved = [_to(v, device) for v in value]
        return value if all(m is v for m, v in zip(moved, value)) else type(value)(moved)
    if isinstance(value, dict):
        moved = {k: _to(v, device) for k, v in value.items()}
        return value if all(moved[k] is v for k, v in value.items()) else moved
    return value


def shard_slice(n: int, shard: tuple[int, int] | None) -> slice:
    """The i-th of ``k`` contiguous, disjoint, near-equal parts of ``range(n)``."""
    if shard is None:
        return slice(0, n)
    i, k = shard
    bounds = np.linspace(0, n, k + 1).round().astype(int)
    return slice(int(bounds[i]), int(bounds[i + 1]))


class WeightedSet:
    """A search set: concatenated tail inputs of several data sets, per-sample labels, data-set
    ids and weights (summing to 1). ``part(shard)`` gives a disjoint slice of every data set."""

    def __init__(self, pieces: list[tuple[str, torch.Tensor, torch.Tensor, float]]):
        # pieces: (data set, inputs, labels, total weight of this data set)
        self.names = [p[0] for p in pieces]
        self.inputs = [p[1] for p in pieces]
        self.labels = [p[2] for p in pieces]
        self.weights = [torch.full((len(p[2]),), p[3] / max(len(p[2]), 1), device=p[2].device) for p in pieces]

    def to(self, device) -> "WeightedSet":
        self.inputs = [x.to(device) for x in self.inputs]
        self.labels = [y.to(device) for y in self.labels]
        self.weights = [w.to(device) for w in self.weights]
        return self

    def part(self, shard):
        xs, ys, ws, names = [], [], [], []
        for name, x, y, w in zip(self.names, self.inputs, self.labels, self.weights):
            s = shard_slice(len(y), shard)
            xs.append(x[s]), ys.append(y[s]), ws.append(w[s]), names.append(name)
        return names, xs, ys, ws
