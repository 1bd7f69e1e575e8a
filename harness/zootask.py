"""What the benchmarks on a model zoo share: loading the zoo, composing task vectors, fixed
seeded subsets of the data, and the merged forward.

The search objective of every zoo task is a *weighted mean of per-sample losses*: each sample
carries a weight so that each data set counts equally, the weights sum to 1 over the search set,
and the loss of a shard is the weighted mean over its samples. Shard losses (and gradients)
therefore reduce exactly to the whole-set loss, and the loss is comparable across searchers.
"""
from __future__ import annotations

import dataclasses
import os
import time
import typing
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from harness.api import Candidate, Evaluation, HarnessError, Space, Task
from harness.composition import Composition, parse_space
from harness.config import coerce


@dataclass
class ZooOptions:
    """Options every zoo task takes: where the model and its task vectors come from.

    By default a built-in zoo (``zoo``, tuned with ``zoo_options="key=value;key=value"``). With
    ``checkpoints`` the model is the user's own open_clip model instead: ``model`` names the
    architecture, ``pretrained`` its weights (a local file, ``local-dir:DIR``, or empty for random
    init), ``checkpoints`` lists one fine-tuned checkpoint per data set as ``NAME=PATH`` (or a
    path whose file stem is the data set name, or a folder of such files), and ``data_root``
    holds image folders ``<data_root>/<NAME>/<split>/<class>/*.png`` for data sets that are not
    built in. ``zoo_options`` then takes ``max_n`` (images per built-in data set).

    ``population``: how a batch of several candidates is scored. ``auto`` times three candidates
    both ways, one ``torch.func.vmap`` pass over the candidates' stacked parameters and one candidate
    after another, and keeps the faster for the rest of the run (on CPU that is sequential: vmap
    measured 0.36× on the effnet tail); ``off`` never tries vmap. The choice is in the record's
    ``task_info``.

    ``select=b`` (b ≥ 1) keeps only the ``b`` most informative task vectors per block, ranked by
    |∂L/∂λ| at the start point before any search (informative block selection, paper App. D.6;
    needs ``--space per_block`` or ``per_partition:K``); 0 keeps them all.
    """

    zoo: str = "effnet"
    zoo_options: str = ""
    model: str = ""
    pretrained: str = ""
    checkpoints: list[str] = field(default_factory=list)
    data_root: str = ""
    bound: float = 1.5
    dtype: str = "fp32"
    select: int = 0
    population: str = "auto"


@dataclass
class UserModelConfig:
    """``zoo_options`` of a user's own model (``checkpoints`` given)."""

    max_n: int = 4000


CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def checkpoint_list(entries: list[str]) -> list[tuple[str, str]]:
    """``["mnist=ft/mnist.pt", "ft/cars.safetensors", "ft/"]`` → ``[(data set, absolute path)]``.

    A bare path names its data set by its file stem; a folder contributes every checkpoint file in
    it. A path that does not exist, or a data set named twice, is an error.
    """
    out: list[tuple[str, str]] = []
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep:
            name, path = "", entry
        path = os.path.abspath(os.path.expanduser(path.strip()))
        if os.path.isdir(path) and not name:
            files = sorted(f for f in os.listdir(path) if f.endswith(CHECKPOINT_SUFFIXES))
            if not files:
                raise HarnessError(f"checkpoint folder {path} holds no {'/'.join(CHECKPOINT_SUFFIXES)} files")
            out += [(os.path.splitext(f)[0], os.path.join(path, f)) for f in files]
            continue
        if not os.path.isfile(path):
            raise HarnessError(f"checkpoint not found: {path} (task option checkpoints)")
        out.append((name.strip() or os.path.splitext(os.path.basename(path))[0], path))
    seen: set[str] = set()
    for name, path in out:
        if name in seen:
            raise HarnessError(f"data set '{name}' has two checkpoints (task option checkpoints); "
                               "name each as NAME=PATH")
        seen.add(name)
    return out


def _config_overrides(cfg_cls, spec: str, what: str) -> dict:
    hints = typing.get_type_hints(cfg_cls)
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    out = {}
    for pair in [p for p in spec.split(";") if p.strip()]:
        k, sep, v = pair.partition("=")
        k = k.strip()
        if not sep or k not in fields:
            raise HarnessError(f"bad zoo option {pair!r} for {what}; valid keys: {', '.join(sorted(fields))}")
        out[k] = coerce(v.strip(), hints[k], f"zoo option '{k}'")
    return out


def parse_zoo_options(zoo: str, spec: str) -> dict:
    """``"max_n=300;ft_steps=10"`` → typed overrides of the zoo's config (unknown keys are errors)."""
    from harness.zoo import ZOOS
    if zoo not in ZOOS:
        raise HarnessError(f"unknown zoo '{zoo}'; valid zoos: {', '.join(ZOOS)}")
    return _config_overrides(type(ZOOS[zoo]), spec, f"zoo '{zoo}'")


class ZooTask(Task):
    """Base class of the tasks that compose a zoo's task vectors. Subclasses pick the data sets and
    the loss; this class holds the source, the composition and the sampling helpers."""

    composes: typing.ClassVar[bool] = True

    def load_source(self):
        o = self.options
        if o.checkpoints:
            from harness.models import from_checkpoints
            pairs = checkpoint_list(o.checkpoints)
            cfg = UserModelConfig(**_config_overrides(UserModelConfig, o.zoo_options, "your own model"))
            self.source = from_checkpoints(o.model, o.pretrained or None, [p for _, p in pairs],
                                           [n for n, _ in pairs], data_root=o.data_root or None,
                                           max_n=cfg.max_n)
            return self.source
        from harness.zoo import get_zoo
        self.source = get_zoo(o.zoo, cache_dir=self.cache_dir, progress=True, **parse_zoo_options(o.zoo, o.zoo_options))
        return self.source

    @property
    def source_name(self) -> str:
        o = self.options
        return f"your model {o.model or o.pretrained}" if o.checkpoints else f"zoo '{o.zoo}'"

    def check_datasets(self, names, what="data set"):
        missing = [d for d in names if d not in self.source.datasets]
        if missing:
            raise HarnessError(f"{what} '{missing[0]}' is not in {self.source_name}; "
                               f"valid: {', '.join(self.source.datasets)}")

    def compose_others(self, target: str):
        """Check ``target`` and compose every *other* data set's task vector (few-shot, TTA)."""
        self.check_datasets([target], "target")
        others = [d for d in self.source.datasets if d != target]
        if not others:
            raise HarnessError(f"{self.name} composes the other data sets' task vectors, "
                               f"but {self.source_name} has only '{target}'")
        return self.compose(others)

    def compose(self, names: list[str], signs: list[float] | None = None):
        """The composition of these data sets' task vectors in the run's space."""
        parse_space(self.space_kind)
        signs = signs or [1.0] * len(names)
        tvs = [{k: s * v for k, v in self.source.task_vectors[d].items()} for d, s in zip(names, signs)]
        dtype = {"fp32": torch.float32, "fp16": torch.float16}[self.options.dtype]
        self.comp = Composition(self.source.base, tvs, names, space=self.space_kind, dtype=dtype, seed=self.seed)
        return self.comp

    @classmethod
    def validate(cls, options):
        """Cheap checks before anything is built or recorded (files exist, values in range)."""
        if options.dtype not in ("fp32", "fp16"):
            raise HarnessError(f"task option dtype must be fp32 or fp16, got {options.dtype!r}")
        if options.bound <= 0:
            raise HarnessError(f"task option bound must be positive, got {options.bound}")
        if options.population not in ("auto", "off"):
            raise HarnessError(f"task option population must be auto or off, got {options.population!r}")
        if options.select < 0:
            raise HarnessError(f"task option select keeps b task vectors per block: b >= 1, or 0 for all; got {options.select}")
        if options.checkpoints:
            if not options.model and not options.pretrained.startswith("local-dir:"):
                raise HarnessError("task option checkpoints needs model (an open_clip architecture, e.g. "
                                   "-t model=ViT-B-32) or pretrained=local-dir:DIR")
            options.checkpoints = [f"{n}={p}" for n, p in checkpoint_list(options.checkpoints)]
            _config_overrides(UserModelConfig, options.zoo_options, "your own model")
        elif options.model or options.pretrained:
            raise HarnessError("task options model/pretrained need checkpoints (one fine-tuned checkpoint "
                               "per data set, -t checkpoints=NAME=PATH,NAME=PATH)")
        else:
            parse_zoo_options(options.zoo, options.zoo_options)
        if options.data_root:
            if not options.checkpoints:
                raise HarnessError("data_root (--data-root) is for your own model: give checkpoints too "
                                   "(-t checkpoints=NAME=PATH,...); the built-in zoos use the built-in data")
            if not os.path.isdir(options.data_root):
                raise HarnessError(f"data root not found: {options.data_root} (a folder holding "
                                   "<data_root>/<data set>/<split>/<class>/*.png)")
            options.data_root = os.path.abspath(options.data_root)

    @classmethod
    def check_space(cls, options, space: str) -> None:
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

    def subset(self, ds: str, split: str, n: int, salt: int = 0) -> torch.Tensor:
        """A fixed random subset of ``n`` indices of a split (all of it if n <= 0), seeded by the run."""
        return self.pick(len(self.source.labels[ds][split]), n, salt)

    def pick(self, size: int, n: int, salt: int = 0) -> torch.Tensor:
        """A fixed random subset of ``n`` of ``size`` indices (all if n <= 0), seeded by the run."""
        if n <= 0 or n >= size:
            return torch.arange(size)
        gen = torch.Generator().manual_seed(self.seed * 7919 + salt)
        return torch.randperm(size, generator=gen)[:n].sort().values

    def params(self, x, grad: bool):
        """Merged parameters for ``x`` and the tensor gradients flow to (None without grad)."""
        xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
        if grad:
            xt = xt.clone().requires_grad_(True)
        return self.comp.merge(xt), xt

    def weighted_ce(self, c: Candidate, data: "WeightedSet", shard=None, regularizer=None) -> Evaluation:
        """Candidate ``c`` on shard ``shard`` of ``data``: the weighted mean cross-entropy (plus
        ``regularizer(coefficients)``, a per-candidate constant that survives the shard reduction)
        and the weighted accuracy. An empty shard has weight 0 and a zero gradient."""
        names, xs, ys, ws = data.part(shard)
        with torch.set_grad_enabled(c.grad):
            params, xt = self.params(c.x, c.grad)
            wsum = float(sum(w.sum() for w in ws))
            if not any(len(y) for y in ys):
                return evaluation(xt.sum() * 0, 0.0, xt, c.grad, {"acc": 0.0})
            loss, acc = _weighted_means(*per_sample_ce(self.source, params, names, xs, ys), ws, wsum)
            if regularizer is not None:
                loss = loss + regularizer(xt)
            return evaluation(loss, wsum, xt, c.grad, {"acc": acc})

    def population_ce(self, cands: list[Candidate], data: "WeightedSet", shard=None) -> list[Evaluation]:
        """:meth:`weighted_ce` of several candidates (no gradients) from one vmap pass of the tail."""
        names, xs, ys, ws = data.part(shard)
        wsum = float(sum(w.sum() for w in ws))
        if len(cands) < 2 or not any(len(y) for y in ys):
            return [self.weighted_ce(c, data, shard) for c in cands]
        with torch.no_grad():
            params = [self.params(c.x, False)[0] for c in cands]
            z = self.source.population_features(params, torch.cat([x for x in xs if len(x)]))
            out = []
            for k in range(len(cands)):
                loss, acc = _weighted_means(*ce_from_features(self.source, z[k], names, xs, ys), ws, wsum)
                out.append(evaluation(loss, wsum, None, False, {"acc": acc}))
        return out

    def score_batch(self, cands: list[Candidate], data: "WeightedSet", shard=None) -> list[Evaluation]:
        """:meth:`weighted_ce` of every candidate: one vmap pass for a batch of several full-set
        scores where that measured faster (``population=auto``), else one after another."""
        plain = len(cands) < 2 or self.options.population == "off" or any(c.grad for c in cands)
        if plain or getattr(self, "_vmap_faster", None) is False:
            return [self.weighted_ce(c, data, shard) for c in cands]
        if getattr(self, "_vmap_faster", None):
            return self.population_ce(cands, data, shard)
        # The trial: the first few candidates both ways (their sequential scores are the ones
        # returned), once per run; the rest of this batch already takes the faster path.
        trial = cands[:3]
        t0 = time.perf_counter()
        seq = [self.weighted_ce(c, data, shard) for c in trial]
        t1 = time.perf_counter()
        try:
            self.population_ce(trial, data, shard)
            t2 = time.perf_counter()
            self._vmap_faster = (t2 - t1) < (t1 - t0)
            note = {"candidates": len(trial), "sequential_s": round(t1 - t0, 4), "vmap_s": round(t2 - t1, 4)}
        except Exception as e:  # an architecture without vmap rules: stay sequential
            self._vmap_faster, note = False, {"vmap_error": f"{type(e).__name__}: {e}"[:200]}
        self.task_info["population"] = {**note, "chosen": "vmap" if self._vmap_faster else "sequential"}
        return seq + self.score_batch(cands[len(trial):], data, shard)

    def accuracy(self, x, ds: str, split: str = "test") -> float:
        with torch.no_grad():
            return self.source.accuracy(self.params(x, False)[0], ds, split)


def _weighted_means(losses, correct, ws, wsum: float):
    """The weighted mean loss (a tensor) and accuracy (a float) of per-sample results."""
    loss = sum((l * w).sum() for l, w in zip(losses, ws)) / wsum
    return loss, float(sum((k.float() * w).sum() for k, w in zip(correct, ws))) / wsum


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

    def __init__(self, source, pieces: list[tuple[str, torch.Tensor, torch.Tensor, float]]):
        # pieces: (data set, inputs, labels, total weight of this data set)
        self.names = [p[0] for p in pieces]
        self.inputs = [p[1] for p in pieces]
        self.labels = [p[2] for p in pieces]
        self.weights = [torch.full((len(p[2]),), p[3] / max(len(p[2]), 1)) for p in pieces]

    def part(self, shard):
        xs, ys, ws, names = [], [], [], []
        for name, x, y, w in zip(self.names, self.inputs, self.labels, self.weights):
            s = shard_slice(len(y), shard)
            xs.append(x[s]), ys.append(y[s]), ws.append(w[s]), names.append(name)
        return names, xs, ys, ws


def per_sample_ce(source, params, names, xs, ys):
    """Per-sample cross-entropy of each data set's samples under its own frozen head, from one
    concatenated tail forward (the tail is shared; only the heads differ)."""
    nonempty = [x for x in xs if len(x)]
    if not nonempty:
        return [torch.zeros(0) for _ in xs], [torch.zeros(0, dtype=torch.bool) for _ in xs]
    return ce_from_features(source, source.features(params, torch.cat(nonempty)), names, xs, ys)


def ce_from_features(source, z, names, xs, ys):
    """:func:`per_sample_ce` from the tail's features ``z`` of the concatenated non-empty inputs."""
    if source.normalize:
        z = F.normalize(z, dim=-1)
    losses, correct, i = [], [], 0
    for name, x, y in zip(names, xs, ys):
        zi = z[i:i + len(x)]
        i += len(x)
        w, b = source.heads[name]
        logits = F.linear(zi, w, b)
        losses.append(F.cross_entropy(logits, y, reduction="none") if len(y) else logits.new_zeros(0))
        correct.append(logits.argmax(1) == y)
    return losses, correct


def evaluation(loss: torch.Tensor, weight: float, xt: torch.Tensor, want_grad: bool, metrics: dict) -> Evaluation:
    """Package a (weighted-mean) loss: backpropagate to the coefficients when a gradient is wanted."""
    grad = None
    if want_grad:
        loss.backward()
        grad = xt.grad.detach().double().numpy().copy()
    return Evaluation(loss=float(loss.detach()), grad=grad, metrics=metrics, weight=float(weight))
