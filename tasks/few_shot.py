"""Few-shot adaptation: learn a composition of the *other* data sets' task vectors from k labelled
shots per class of a target (aTLAS §4.2)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import torch.nn.functional as F

from harness.api import Candidate, HarnessError, Space, option
from harness.engines import package
from harness.objective import ComposeOptions, ComposingTask, WeightedSet
from harness.sources.base import few_shot_indices, scalar
from harness.data.augment import augment

from . import adapters


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

    ``adapter`` puts a few-shot adapter (:mod:`atlas_harness_tasks.adapters`: ``tip``, ``tip-f``,
    ``lpp``) on top of the composed model, built from the same shots (and views). ``sequential``:
    the search learns the coefficients as without it; the adapter is then built (and, for
    ``tip-f`` and ``lpp``, trained for ``adapter_steps`` full-batch AdamW steps at ``adapter_lr``;
    LP++ with ``lpp_solver=lipschitz`` instead for ``adapter_steps`` rounds of the paper's
    block-coordinate steps, of sizes from the shots' Lipschitz constants, recorded as
    ``lpp_step_p`` and ``lpp_step_a``) on the shots' features under the coefficients found, and
    ``acc`` is the adapted model's (``composed_acc`` is the composition's alone). ``joint``: the
    adapter's parameters are extra coordinates of the search space, ``init + adapter_scale · x``
    (so a searcher's learning rate lr moves them at adapter_scale × lr), learned with the
    coefficients from one loss (gradient searchers); ``init`` is built from the start point's
    features. The zero-shot searcher with an
    adapter is the adapter alone (Tip-Adapter, LP++ on the pre-trained model).
    """

    name = "few_shot"
    description = "few-shot: k labelled shots per class of a target, other data sets' task vectors (train shots → test)"
    selects_vectors = True
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
        adapter: str = option("none", "few-shot adapter on top of the composed model: tip (Tip-Adapter), tip-f "
                                      "(Tip-Adapter-F), lpp (LP++) or none", choices=adapters.ADAPTERS)
        adapter_mode: str = option("sequential", "sequential: train the adapter after the coefficient search; joint: "
                                                 "learn it with the coefficients as extra coordinates",
                                   choices=("sequential", "joint"))
        adapter_steps: int = option(300, "full-batch AdamW steps training the adapter in sequential mode (LP++ with "
                                          "lpp_solver=lipschitz: block-coordinate rounds)", ge=0)
        adapter_lr: float = option(1e-3, "learning rate of the sequential adapter training", gt=0)
        adapter_scale: float = option(0.01, "joint mode: the adapter's parameters are init + adapter_scale × x", gt=0)
        lpp_solver: str = option("adam", "LP++'s sequential training: adam (full-batch AdamW, adapter_lr) or "
                                         "lipschitz (the paper's block-coordinate steps on prototypes and blends, "
                                         "sizes 1/L from the shots' Lipschitz constants, no learning rate), "
                                         "adapter_steps rounds", choices=("adam", "lipschitz"))
        tip_alpha: float = option(1.0, "Tip-Adapter's residual ratio α (weight of the cache logits)", ge=0)
        tip_beta: float = option(5.5, "Tip-Adapter's sharpness β of the cache affinities", gt=0)
        tip_search: bool = option(False, "choose Tip-Adapter's α and β on the target's validation split after training, "
                                         "over Tip-Adapter's grid (β 200 values in [0.1, 7), α 20 in [0.1, 3))")
        fraction: float = option(0.0, "train on this seeded fraction of the target's train split instead of `shots` "
                                      "per class (e.g. 0.01 … 1; 0: use shots)", ge=0, le=1)

    @classmethod
    def data_for(cls, options) -> str:
        if getattr(options, "fraction", 0):
            return f"{options.fraction:.0%} of the labelled train split"
        if getattr(options, "tip_search", False):
            return f"{cls.data}; the validation split chooses Tip-Adapter's α and β"
        return cls.data

    @classmethod
    def validate(cls, options):
        super().validate(options)
        if options.tip_search and options.adapter not in ("tip", "tip-f"):
            raise HarnessError(f"tip_search chooses Tip-Adapter's α and β: use adapter=tip or tip-f "
                               f"(got adapter={options.adapter!r})")
        if options.lpp_solver != "adam" and options.adapter != "lpp":
            raise HarnessError(f"lpp_solver={options.lpp_solver} trains LP++: use adapter=lpp "
                               f"(got adapter={options.adapter!r})")
        if options.lpp_solver != "adam" and options.adapter_mode == "joint":
            raise HarnessError(f"lpp_solver={options.lpp_solver} trains LP++ after the search; with "
                               f"adapter_mode=joint the searcher learns it: use adapter_mode=sequential")
        if options.adapter_mode == "joint" and options.adapter not in ("tip-f", "lpp"):
            raise HarnessError(f"adapter_mode=joint learns the adapter with the coefficients: use adapter=tip-f or lpp "
                               f"({options.adapter!r} has no parameters to learn)")

    def prepare(self):
        src, o = self.load_source(), self.options
        self.compose_others(o.target)
        y = src.labels[o.target]["train"]
        # Seeded by the run seed (and salted so the shots differ from those the zoo's heads saw).
        if o.fraction:  # a seeded share of the whole train split (aTLAS×K against LoRA, paper Table 17)
            self.shot_idx = self.pick(len(y), max(1, round(o.fraction * len(y))), salt=103)
        else:
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
        self.adapter = None
        if o.adapter != "none":
            self.adapter = self.make_adapter(self.zero, x, ys)
            self.task_info["adapter"] = {"name": o.adapter, "mode": o.adapter_mode, "parameters": self.adapter.size}
            if o.lpp_solver != "adam":
                self.task_info["adapter"]["solver"] = o.lpp_solver

    def make_adapter(self, coef, x, ys) -> adapters.Adapter:
        """The adapter built from the shots' features (and head logits) under coefficients ``coef``."""
        o, src = self.options, self.source
        with torch.no_grad():
            z = src.features(self.engine.params(coef, False)[0], x)
            h = src.head(z, o.target)
        return adapters.make(o.adapter, z, ys, len(src.classes[o.target]), o.tip_alpha, o.tip_beta, h)

    @property
    def joint(self) -> bool:
        return self.adapter is not None and self.options.adapter_mode == "joint"

    def setup(self, device: str = "cpu") -> None:
        super().setup(device)
        if self.adapter is not None:
            for k, v in vars(self.adapter).items():
                if isinstance(v, torch.Tensor):
                    setattr(self.adapter, k, v.to(self.engine.device))

    def space(self) -> Space:
        base = super().space()
        if not self.joint:
            return base
        n = self.adapter.size
        b = self.options.bound
        return Space(dim=base.dim + n, lower=-b, upper=b, kind=base.kind,
                     labels=list(base.labels) + [f"adapter/{self.adapter.name}[{i}]" for i in range(n)])

    def data_touched(self, searched: bool) -> str:
        """An adapter reads the shots (and ``tip_search`` the validation split) whatever the searcher."""
        return super().data_touched(searched or self.adapter is not None)

    def learnable_parameters(self, searched: bool) -> int:
        """The searched coordinates, plus an adapter trained after the search (sequential)."""
        after = self.adapter.size if self.adapter is not None and not self.joint else 0
        return super().learnable_parameters(searched) + after

    def expand(self, x):
        return super().expand(np.asarray(x)[:self.comp.dim])

    def joint_ce(self, c: Candidate, data: WeightedSet, shard, reg):
        """The joint objective of ``c``: cross-entropy of the adapted logits under the composition of
        ``c.x``'s first coordinates and the adapter parameters of the rest (gradient w.r.t. both)."""
        _, xs, ys, ws = data.part(shard)
        k, t, src = self.comp.dim, self.options.target, self.source
        with torch.set_grad_enabled(c.grad):
            xt = torch.as_tensor(np.asarray(c.x, dtype=np.float32), device=self.engine.device)
            if c.grad:
                xt = xt.clone().requires_grad_(True)
            wsum = scalar(ws[0].sum())
            if not len(ys[0]):
                return package(xt.sum() * 0, 0.0, xt, c.grad, {"acc": 0.0})
            z = src.features(self.comp.merge(xt[:k]), xs[0])
            logits = self.adapter.logits(z, src.head(z, t), self.adapter.init + self.options.adapter_scale * xt[k:])
            loss = (F.cross_entropy(logits, ys[0], reduction="none") * ws[0]).sum() / wsum
            acc = scalar(((logits.argmax(1) == ys[0]).float() * ws[0]).sum()) / wsum
            if reg is not None:
                loss = loss + reg(xt[:k])
            return package(loss, wsum, xt, c.grad, {"acc": acc})

    def adapted_accuracy(self, coef, adapter: adapters.Adapter, p) -> float:
        """Test accuracy of the target under coefficients ``coef`` with ``adapter`` (parameters ``p``)."""
        t, src = self.options.target, self.source
        params = self.engine.params(coef, False)[0]
        y, correct, i = src.labels[t]["test"], 0, 0
        with torch.no_grad():
            for xb in src.batches(t, "test", 512):
                z = src.features(params, xb)
                correct += scalar((adapter.logits(z, src.head(z, t), p).argmax(1) == y[i:i + len(xb)]).sum())
                i += len(xb)
        return correct / max(len(y), 1)

    def _minibatch(self, seed: int) -> WeightedSet:
        x, y = self.search.inputs[0], self.search.labels[0]
        idx = self.minibatch(len(y), self.options.batch_size, torch.Generator().manual_seed(seed))
        return WeightedSet([(self.options.target, x[idx], y[idx], 1.0)])

    minibatch_outputs = True

    @classmethod
    def returns_outputs(cls, options) -> bool:
        # The joint adapter's logits are not the head's; an L1 term is not a function of the logits.
        return not (options.adapter != "none" and options.adapter_mode == "joint") and not options.l1

    def evaluate(self, candidates: list[Candidate], shard=None):
        l1 = self.options.l1
        reg = (lambda xt: l1 * xt.abs().mean()) if l1 else None
        if self.joint:
            return [self.joint_ce(c, self.search if c.batch is None else self._minibatch(c.batch), shard, reg)
                    for c in candidates]
        full = [c for c in candidates if c.batch is None]
        out = iter(self.engine.score(full, self.search, shard, reg))
        return [next(out) if c.batch is None else self.engine.weighted_ce(c, self._minibatch(c.batch), shard, reg)
                for c in candidates]

    def final(self, x):
        o, k = self.options, self.comp.dim
        coef = np.asarray(x)[:k]
        composed = self.accuracy(coef, o.target, "test")
        if self.adapter is None:
            return self._metrics(composed)
        if self.joint:
            adapter, p = self.adapter, self.adapter.init + o.adapter_scale * torch.as_tensor(
                np.asarray(x, dtype=np.float32)[k:], device=self.engine.device)
        else:
            x_shots, y_shots = self.search.inputs[0], self.search.labels[0]
            adapter = self.make_adapter(coef, x_shots, y_shots)
            with torch.no_grad():
                z = self.source.features(self.engine.params(coef, False)[0], x_shots)
                h = self.source.head(z, o.target)
            if o.lpp_solver == "lipschitz":
                p = adapters.train_lpp_mm(adapter, z, h, y_shots, o.adapter_steps)
                step_p, step_a = adapters.lpp_step_sizes(adapter, z, h)
                return {**self._metrics(self.adapted_accuracy(coef, adapter, p), composed),
                        "lpp_step_p": step_p, "lpp_step_a": step_a}
            p = adapters.train(adapter, z, h, y_shots, o.adapter_steps, o.adapter_lr)
        if not o.tip_search:
            return self._metrics(self.adapted_accuracy(coef, adapter, p), composed)
        z, h = self.target_features(coef, "val")
        adapter.alpha, adapter.beta, val_acc = adapters.search_tip(adapter, p, z, h, self.source.labels[o.target]["val"])
        return {**self._metrics(self.adapted_accuracy(coef, adapter, p), composed), "tip_alpha": adapter.alpha,
                "tip_beta": adapter.beta, "tip_val_acc": val_acc}

    @torch.no_grad()
    def target_features(self, coef, split: str):
        """Features and head logits of the target's ``split`` under coefficients ``coef``."""
        params, t = self.engine.params(coef, False)[0], self.options.target
        z = torch.cat([self.source.features(params, xb) for xb in self.source.batches(t, split, 512)])
        return z, self.source.head(z, t)

    def _metrics(self, acc: float, composed: float | None = None) -> dict:
        out = {"acc": acc, "zero_shot_acc": self.zero_shot_acc, "gain": acc - self.zero_shot_acc}
        if self.adapter is not None:
            out["composed_acc"] = acc if composed is None else composed
        return out

    def references(self):
        """Zero-shot (the pre-trained model, no adapter), and (for scale only: the search never sees
        it) the target's own fine-tuned tail."""
        t = self.options.target
        ft = self.source.meta.get("finetuned_acc", {}).get(t)
        refs = {"zero-shot": self._metrics(self.zero_shot_acc)}
        if ft is not None:
            refs["fine-tuned on the target (not used)"] = self._metrics(ft)
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
