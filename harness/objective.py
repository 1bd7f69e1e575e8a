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

import sys
import typing

import numpy as np
import torch

import harness.registry as registry
from harness.api import HarnessError, Space, Task
from harness.errors import SetupRefusal
from harness.compose_options import (ENGINE_FIELDS, SOURCE_FIELDS, ComposeOptions, resolve_engine,  # noqa: F401
                                     resolve_source, source_name)
from harness.composition import Composition, parse_space
from harness.sources.base import content_hash, data_hash


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
            raise SetupRefusal(f"{what} '{missing[0]}' is not in {self.source_name}; "
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
        if getattr(self.options, "lora_form", "dense") == "factors":
            self.comp = self.factor_composition(names, signs, dtype)
        else:
            self.comp = Composition(self.source.base, tvs, names, space=self.space_kind, dtype=dtype, seed=self.seed)
        cls, opts = resolve_engine(self.options)
        self.engine = cls(self.source, self.comp, "cpu", opts)
        self.task_info = self.engine.info  # what the engine chooses is recorded with the run
        if self.options.transform:
            self.task_info["transform"] = self.transform_info
        return self.comp

    def factor_composition(self, names: list[str], signs: list[float], dtype):
        """The LoRA task vectors of ``names`` in factor form (a sign −1 negates B)."""
        from harness.lora import FactorComposition
        missing = [d for d in names if d not in self.source.lora_factors]
        if missing:
            raise HarnessError(f"lora_form=factors needs LoRA task vectors, and {self.source_name} has no factors for "
                               f"'{missing[0]}': give PEFT LoRA adapter folders as checkpoints (hf_clip) or build the zoo with "
                               f"-t source_options=ft_mode=lora")
        factors = [{k: (a, s * b) for k, (a, b) in self.source.lora_factors[d].items()} for d, s in zip(names, signs)]
        return FactorComposition(self.source.base, factors, names, space=self.space_kind, dtype=dtype, seed=self.seed)

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
        if options.select_vectors and not cls.selects_vectors:
            raise HarnessError(f"task option select_vectors chooses among the other data sets' task vectors "
                               f"(few_shot, tta); {cls.name} composes a fixed set")
        engine, _ = resolve_engine(options)
        if getattr(engine, "needs_linearized", False) and not options.linearize:
            raise HarnessError(f"engine {engine.name} scores linearised models only: add -t linearize=true "
                               f"(or use -t engine=local)")
        if options.transform:
            import harness.transforms as transforms
            options.transform = transforms.canonical(options.transform)
        if options.lora_form == "factors":
            clash = [f"{k}={getattr(options, k)}" for k in ("transform", "select", "select_vectors", "linearize")
                     if getattr(options, k)]
            if clash or getattr(engine, "needs_linearized", False):
                raise HarnessError(f"lora_form=factors composes LoRA factors as they are; it does not combine with "
                                   f"{(clash or [f'engine={options.engine}'])[0]}")

    # Whether the task composes a pool it may choose from (select_vectors): the other data sets'.
    selects_vectors = False
    # Whether --space norms (norm-layer tuning, no task vector) is a baseline of this task.
    tunes_norms = False
    # Whether --space lora:R (LoRA fine-tuning of the pre-trained model, a baseline) applies: not where
    # the task's references and report are built on the composed task vectors (addition, negation).
    tunes_lora = True

    @classmethod
    def check_space(cls, options, space: str) -> None:
        if getattr(options, "lora_form", "dense") == "factors" and space not in ("per_block", "per_layer"):
            raise HarnessError(f"lora_form=factors composes in --space per_block or per_layer (a λ for A and one for B), "
                               f"not {space}")
        if space == "norms" and not cls.tunes_norms:
            raise HarnessError(f"--space norms (norm-layer tuning) is a test-time adaptation baseline: use it with "
                               f"--task tta, not {cls.name}")
        if space.startswith("lora") and not cls.tunes_lora:
            raise HarnessError(f"--space {space} fine-tunes LoRA adapters of the pre-trained model, a baseline of few_shot "
                               f"and tta; {cls.name} composes the task vectors (use a per_* space)")
        if options.select and not space.startswith(("per_block", "per_partition")):
            raise HarnessError(f"task option select (informative block selection) needs --space per_block or "
                               f"per_partition:K, not {space}")

    def after_setup(self) -> dict:
        out = {}
        if getattr(self.options, "select_vectors", 0):
            from harness.selection import select_vectors
            out["vector_selection"] = select_vectors(self, min(self.options.select_vectors, self.comp.T),
                                                     self.options.select_by)
            self.after_reselect()
        if self.options.select:
            from harness.selection import select_informative
            out["selection"] = select_informative(self, min(self.options.select, self.comp.T))
        return out

    def after_reselect(self) -> None:
        """Called when :meth:`after_setup` has rebuilt the composition with fewer task vectors:
        a task holding arrays sized to the space (its start point) rebuilds them here."""
        if hasattr(self, "zero"):
            self.zero = np.zeros(self.comp.dim)

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
