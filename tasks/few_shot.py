"""Few-shot adaptation: learn a composition of the *other* data sets' task vectors from k labelled
shots per class of a target (aTLAS §4.2)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from harness.api import Candidate, option
from harness.objective import ComposeOptions, ComposingTask, WeightedSet
from harness.sources.base import few_shot_indices
from harness.data.augment import augment


class FewShotTask(ComposingTask):
    """Compose every data set's task vector except the target's own; search on ``shots`` labelled
    samples per class of the target's train split, drawn with the run seed; report on its test split.

    Search loss: mean cross-entropy of the shots (and of ``augment`` extra augmented views of each
    shot, drawn once in setup) under the target's frozen head, plus ``l1`` × mean|λ| (the paper's
    optional L1 term). Whole-set scores use every shot; a gradient step uses a random mini-batch
    of ``batch_size`` of them (all of them when there are fewer). Reported on test: ``acc``
    (headline) and ``zero_shot_acc`` of the target, and their difference ``gain``.

    ``calibrate`` first fits one temperature to the shots at the start point (the target head's
    logits scaled by the s minimising the shots' cross-entropy, found by golden-section search on
    log s), so the search cannot lower the loss merely by calming an over-confident head: at the
    start, the scale is already the best one. Accuracy is unchanged by a positive scale. The
    temperature 1/s is recorded in ``task_info``.
    """

    name = "few_shot"
    description = "few-shot: k labelled shots per class of a target, other data sets' task vectors (train shots → test)"
    headline = "acc"
    higher_is_better = True
    data = "few labelled train shots"

    @dataclass
    class Options(ComposeOptions):
        target: str = option("animals", "data set to adapt to; every other data set's task vector is composed")
        shots: int = option(4, "labelled train samples per class of the target, drawn with the run seed", ge=1)
        augment: int = option(0, "extra strongly augmented views of each shot, drawn once (0: none)", ge=0)
        flip: bool = option(True, "allow horizontal flips in the augmented views (off where mirroring changes the class)")
        l1: float = option(0.0, "weight of the L1 term l1 × mean|λ| added to the search loss (0: none)", ge=0)
        batch_size: int = option(64, "shots in a gradient step's random mini-batch (all of them when fewer)", ge=1)
        calibrate: bool = option(False, "first fit one temperature to the shots at the start point, so the search "
                                        "cannot lower the loss merely by rescaling the head's logits")

    def prepare(self):
        src, o = self.load_source(), self.options
        self.compose_others(o.target)
        y = src.labels[o.target]["train"]
        # Seeded by the run seed (and salted so the shots differ from those the zoo's heads saw).
        self.shot_idx = few_shot_indices(y, o.shots, seed=self.seed * 7919 + 101).sort().values
        x, ys = src.inputs[o.target]["train"][self.shot_idx], y[self.shot_idx]
        if o.augment:
            raw = src.images[o.target]["train"][self.shot_idx.numpy()]
            rng = np.random.default_rng([self.seed, 102])
            views = [src.encode(augment(raw, rng, "strong", o.flip)) for _ in range(o.augment)]
            x, ys = torch.cat([x, *views]), ys.repeat(1 + o.augment)
        self.search = WeightedSet([(o.target, x, ys, 1.0)])
        self.zero = np.zeros(self.comp.dim)
        if o.calibrate:
            with torch.no_grad():
                z = src.logits(self.engine.params(self.zero, False)[0], x, o.target)
            scale = fit_scale(z, ys)
            w, b = src.heads[o.target]
            src.heads = {**src.heads, o.target: (w * scale, None if b is None else b * scale)}  # a new dict: no sharing
            self.task_info["temperature"] = round(1.0 / scale, 6)
        self.zero_shot_acc = self.accuracy(self.zero, o.target, "test")

    def _minibatch(self, seed: int) -> WeightedSet:
        x, y = self.search.inputs[0], self.search.labels[0]
        idx = self.minibatch(len(y), self.options.batch_size, torch.Generator().manual_seed(seed))
        return WeightedSet([(self.options.target, x[idx], y[idx], 1.0)])

    def evaluate(self, candidates: list[Candidate], shard=None):
        l1 = self.options.l1
        reg = (lambda xt: l1 * xt.abs().mean()) if l1 else None
        full = [c for c in candidates if c.batch is None]
        out = iter(self.engine.score(full, self.search, shard, reg))
        return [next(out) if c.batch is None else self.engine.weighted_ce(c, self._minibatch(c.batch), shard, reg)
                for c in candidates]

    def final(self, x):
        acc = self.accuracy(x, self.options.target, "test")
        return {"acc": acc, "zero_shot_acc": self.zero_shot_acc, "gain": acc - self.zero_shot_acc}

    def references(self):
        """Zero-shot, and (for scale only: the search never sees it) the target's own fine-tuned tail."""
        t = self.options.target
        ft = self.source.meta.get("finetuned_acc", {}).get(t)
        refs = {"zero-shot": self.final(self.zero)}
        if ft is not None:
            refs["fine-tuned on the target (not used)"] = {"acc": ft, "zero_shot_acc": self.zero_shot_acc,
                                                         "gain": ft - self.zero_shot_acc}
        return refs


def fit_scale(logits: torch.Tensor, labels: torch.Tensor, lo: float = -5.0, hi: float = 3.0, steps: int = 60) -> float:
    """The s > 0 minimising the mean cross-entropy of ``s · logits`` (golden-section search on
    log s over [lo, hi]; the loss is convex in s)."""
    import math
    import torch.nn.functional as F

    def loss(t: float) -> float:
        return float(F.cross_entropy(logits * math.exp(t), labels))
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(steps):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = loss(d)
    return math.exp((a + b) / 2)
