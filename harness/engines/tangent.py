"""The tangent engine: linearised models scored from per-coefficient Jacobian products.

Under ``-t linearize=true`` the tail's output is ``f(x; θ0) + J·(θ(λ) − θ0)``, and a merge
``θ(λ) = θ0 + Σ_i λ_i d_i`` is affine in the coefficients in every space, so the output is exactly

    z(x; λ) = f(x; θ0) + Σ_i λ_i · J(x; θ0)·d_i.

This engine computes the ``dim`` products ``G_i = J·d_i`` (one forward-mode pass each, with
``d_i = merge(e_i) − θ0``) and ``f(x; θ0)`` once per search set, and then scores every candidate —
loss, accuracy and gradient — from one ``(dim) × (dim, N·D)`` product and the heads: no tail
forward at all (:meth:`score`; mini-batches a task scores one at a time take the direct
linearised path). That pays when the search scores a set more often than it has coefficients
(per task, per layer, or long per-block searches); the set-up cost and the memory (``dim × N × D``
floats) are recorded in ``task_info["tangent"]``. Sets whose products would exceed
:data:`MAX_BYTES` are scored on the direct linearised path, which gives the same values.
"""
from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import torch

from harness.api import Candidate, Evaluation, HarnessError
from harness.engines import package
from harness.engines.local import LocalEngine, LocalOptions, _weighted_means, ce_from_features
from harness.sources.base import scalar

MAX_BYTES = 4 * 2**30  # the products of one search set are kept only under this size
CACHED_SETS = 2  # search sets whose products are kept (least recently used dropped first)


class TangentEngine(LocalEngine):
    """Scores candidates of a linearised model from cached Jacobian products (see the module)."""

    name = "tangent"
    description = ("linearised models (-t linearize=true): f(x;θ0) + Σ λ_i J·d_i from one JVP per coefficient, "
                   "computed once per search set")
    Options = LocalOptions
    needs_linearized = True  # tasks refuse it without -t linearize=true, before anything is built

    @classmethod
    def validate(cls, options):
        super().validate(options)
        if options.precision != "fp32":
            raise HarnessError(f"engine tangent computes in fp32 (its products are exact sums); "
                               f"precision {options.precision!r} is not available with it")

    def __init__(self, source, composition, device: str, options):
        if not getattr(source, "linearized", False):
            raise HarnessError("engine tangent scores linearised models only: add -t linearize=true "
                               "(or use -t engine=local)")
        super().__init__(source, composition, device, options)
        self._sets: OrderedDict = OrderedDict()
        self.info["tangent"] = {"sets": 0, "setup_s": 0.0, "cached_mb": 0.0, "skipped": []}

    def products(self, xs) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(f0, G)`` for the concatenated non-empty inputs ``xs``: ``f0`` is ``(N, D)``, ``G``
        ``(dim, N·D)``; None where they would exceed :data:`MAX_BYTES`."""
        # The entry holds the composition and the inputs themselves, so no other object can take their
        # memory (and the addresses that key the entry) while it is kept.
        key = (id(self.comp), tuple((x.data_ptr(), x.storage_offset(), tuple(x.shape), str(x.device)) for x in xs))
        if key in self._sets:
            self._sets.move_to_end(key)
            return self._sets[key][1]
        x = torch.cat([x for x in xs if len(x)])
        t0 = time.perf_counter()
        with torch.no_grad():
            f0 = self.source.features(self.source.base, x).float()
            need = self.comp.dim * f0.numel() * 4
            note = self.info["tangent"]
            if need > MAX_BYTES:
                note["skipped"].append({"inputs": len(x), "coefficients": self.comp.dim, "mb": round(need / 2**20)})
                self._sets[key] = ((self.comp, list(xs)), None)
                return None
            G = torch.empty(self.comp.dim, f0.numel(), device=f0.device)
            zero = self.comp.merge(np.zeros(self.comp.dim, dtype=np.float32))
            for i in range(self.comp.dim):
                e = np.zeros(self.comp.dim, dtype=np.float32)
                e[i] = 1.0
                d = self.comp.merge(e)
                # merge(e_i) − θ0 as parameters: the tangent is d − θ0 = merge(e_i) − merge(0).
                step = {k: self.source.base[k] + (d[k] - zero[k]) for k in d}
                G[i] = self.source.tangent_features(step, x).float().reshape(-1)
        note["sets"] += 1
        note["setup_s"] = round(note["setup_s"] + time.perf_counter() - t0, 4)
        note["cached_mb"] = round(note["cached_mb"] + need / 2**20, 1)
        self._sets[key] = ((self.comp, list(xs)), (f0, G))
        while len(self._sets) > CACHED_SETS:
            self._sets.popitem(last=False)
        return f0, G

    def score(self, cands: list[Candidate], data, shard=None, regularizer=None) -> list[Evaluation]:
        """Every candidate from the set's cached products (computed on its first score); mini-batches
        that tasks score one at a time through :meth:`weighted_ce` take the direct linearised path."""
        if not cands:
            return []
        if any(c.outputs for c in cands):  # logits asked for: the direct linearised path gives them
            return super().score(cands, data, shard, regularizer)
        names, xs, ys, ws = data.part(shard)
        self.size_chunk(lambda: next((x[:16] for x in xs if len(x)), None))
        cached = self.products(xs) if any(len(y) for y in ys) else None
        if cached is None:
            return super().score(cands, data, shard, regularizer)
        f0, G = cached
        wsum = scalar(sum(w.sum() for w in ws))
        out = []
        for c in cands:
            with torch.set_grad_enabled(c.grad):
                xt = torch.as_tensor(np.asarray(c.x, dtype=np.float32), device=self.device)
                if c.grad:
                    xt = xt.clone().requires_grad_(True)
                z = f0 + (xt @ G).view_as(f0)
                loss, acc = _weighted_means(*ce_from_features(self.source, z, names, xs, ys), ws, wsum)
                if regularizer is not None:
                    loss = loss + regularizer(xt)
                out.append(package(loss, wsum, xt, c.grad, {"acc": acc}))
        return out
