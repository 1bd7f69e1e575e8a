"""Task addition: one model good at every data set, by composing all their task vectors."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from harness.api import Candidate, HarnessError, option
from harness.engines import package
from harness.objective import ComposeOptions, ComposingTask, WeightedSet

_GRID = np.linspace(0.0, 1.0, 21)


class AdditionTask(ComposingTask):
    """Compose every data set's task vector; search on the validation splits, report on test.

    Search loss (comparable across searchers): the mean over data sets of the mean cross-entropy
    on a fixed, seeded subset of ``search_n`` validation images per data set (gradient steps use
    random mini-batches of ``batch_size`` per data set from the whole validation split).
    Reported: per-data-set test accuracy, the mean absolute accuracy and the mean normalised
    accuracy (each data set's accuracy ÷ that of its own fine-tuned model), the headline.

    ``objective=entropy`` is AdaMerging's (Yang et al. 2024) instead: the mean over data sets of
    the prediction entropy on a seeded subset of ``search_n`` *unlabelled test* images per data set
    (test-time, transductive: labels are read only for the reported accuracies).
    """

    name = "addition"
    tunes_lora = False
    description = "task addition: compose all task vectors into one multi-task model (validation → test)"
    headline = "normalized_acc"
    higher_is_better = True
    data = "labelled validation"

    @dataclass
    class Options(ComposeOptions):
        datasets: list[str] = option(help="data sets whose task vectors are composed and scored "
                                          "(empty: every data set of the source with a task vector)",
                                     default_factory=list)
        search_n: int = option(64, "search-set images per data set, a fixed seeded subset of the searched split (0: all of it)", ge=0)
        batch_size: int = option(32, "images per data set in a gradient step's random mini-batch", ge=1)
        l1: float = option(0.0, "weight of an L1 penalty l1 × mean|λ| on the coefficients, added to the search loss "
                                "(0: none)", ge=0)
        l2: float = option(0.0, "weight of an L2 penalty l2 × mean λ² on the coefficients, added to the search loss "
                                "(0: none)", ge=0)
        objective: str = option("ce", "ce: cross-entropy on labelled validation (aTLAS); entropy: prediction "
                                      "entropy on unlabelled test (AdaMerging)", choices=("ce", "entropy"))

    @classmethod
    def data_for(cls, options) -> str:
        return "unlabelled test" if options.objective == "entropy" else cls.data

    minibatch_outputs = True

    @classmethod
    def returns_outputs(cls, options) -> bool:
        return options.objective == "ce" and not options.l1 and not options.l2

    @property
    def split(self) -> str:
        """The split the search objective reads: validation (labelled) or test (inputs only)."""
        return "test" if self.options.objective == "entropy" else "val"

    def prepare(self):
        src = self.load_source()
        # By default every data set with a task vector (a source may carry data-only sets).
        self.names = list(self.options.datasets) or [d for d in src.datasets if d in src.task_vectors]
        self.check_datasets(self.names)
        if len(set(self.names)) != len(self.names):
            raise HarnessError(f"task option datasets lists a data set twice: {','.join(self.names)}")
        self.compose(self.names)
        T = len(self.names)
        pieces = []
        for k, ds in enumerate(self.names):
            idx = self.subset(ds, self.split, self.options.search_n, salt=k)
            pieces.append((ds, src.inputs[ds][self.split][idx], self._labels(ds, idx), 1.0 / T))
        self.search = WeightedSet(pieces)
        self.ft_acc = {ds: src.meta["finetuned_acc"][ds] for ds in self.names}

    def _minibatch(self, seed: int):
        src, gen = self.source, torch.Generator().manual_seed(seed)
        pieces = []
        for ds in self.names:
            n = len(src.inputs[ds][self.split])
            idx = self.minibatch(n, self.options.batch_size, gen)
            pieces.append((ds, src.inputs[ds][self.split][idx], self._labels(ds, idx), 1.0 / len(self.names)))
        return WeightedSet(pieces)

    def _labels(self, ds: str, idx):
        """Validation labels for ``ce``; for ``entropy`` -1 placeholders (test labels are never searched on)."""
        if self.options.objective == "entropy":
            return torch.full((len(idx),), -1, dtype=torch.long)
        return self.source.labels[ds]["val"][idx]

    def _entropy(self, c: Candidate, data: WeightedSet, shard=None):
        """The weighted mean prediction entropy of candidate ``c`` (AdaMerging's objective)."""
        names, xs, _, ws = data.part(shard)
        with torch.set_grad_enabled(c.grad):
            params, xt = self.params(c.x, c.grad)
            wsum = float(sum(w.sum() for w in ws))
            reg = self.penalty(self.options.l1, self.options.l2)
            if not any(len(x) for x in xs):
                return package(xt.sum() * 0, 0.0, xt, c.grad, {})
            z = self.source.features(params, torch.cat([x for x in xs if len(x)]))
            total, i = 0, 0
            for ds, x, w in zip(names, xs, ws):
                logits = self.source.head(z[i:i + len(x)], ds)
                i += len(x)
                logp = logits.log_softmax(1)
                total = total + (w * -(logp.exp() * logp).sum(1)).sum()
            return package(total / wsum + (reg(xt) if reg else 0), wsum, xt, c.grad, {})

    def evaluate(self, candidates: list[Candidate], shard=None):
        if self.options.objective == "entropy":
            return [self._entropy(c, self.search if c.batch is None else self._minibatch(c.batch), shard)
                    for c in candidates]
        reg = self.penalty(self.options.l1, self.options.l2)
        full = [i for i, c in enumerate(candidates) if c.batch is None and not c.grad]
        out = dict(zip(full, self.engine.score([candidates[i] for i in full], self.search, shard, reg)))
        return [out[i] if i in out else self.engine.weighted_ce(c, self._minibatch(c.batch) if c.batch is not None
                                                         else self.search, shard, reg)
                for i, c in enumerate(candidates)]

    def final(self, x):
        acc = {ds: self.accuracy(x, ds, "test") for ds in self.names}
        out = {f"acc/{ds}": a for ds, a in acc.items()}
        out["abs_acc"] = float(np.mean(list(acc.values())))
        # A data set whose fine-tuned model scores 0 has no normalised accuracy; the mean skips it.
        norm = [acc[ds] / self.ft_acc[ds] for ds in self.names if self.ft_acc[ds] > 0]
        out["normalized_acc"] = float(np.mean(norm)) if norm else float("nan")
        return out

    def references(self):
        """Zero-shot, task arithmetic (α on the paper's grid, chosen by search loss) and fine-tuned."""
        zero = np.zeros(self.comp.dim)
        losses = [self.evaluate([Candidate(x=self.comp.isotropic(a))])[0].loss for a in _GRID]
        alpha = float(_GRID[int(np.argmin(losses))])
        ft = {f"acc/{ds}": self.ft_acc[ds] for ds in self.names}
        ft.update(abs_acc=float(np.mean(list(self.ft_acc.values()))), normalized_acc=1.0)
        return {"zero-shot": self.final(zero), self.ta_label(alpha): self.final(self.comp.isotropic(alpha)),
                "fine-tuned (each its own)": ft}
