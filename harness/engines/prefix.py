"""Prefix reuse: score a candidate that changes only the later stages of the tail from the
activations a kept candidate left at the first stage it changes.

A searcher that probes coordinates one at a time around an anchor (``dfo-gn``) asks for many
candidates that differ from the anchor in one coefficient, hence in the parameters of one block.
Everything before that block computes the same activations as for the anchor. A tail that runs as
a chain of stages lets the engine keep the anchor's state entering each stage and rerun only the
stages from the first changed one. Known chains: a tail with a ``stages()`` method (the embedded
default's EfficientNet tail, :class:`harness.sources.effnet.EffnetTail`: 20 stages) and open_clip's
ViT image tower (:func:`harness.sources.clip.vit_stages`: embeddings, each residual block, pooling).

Exactness: the stages are the forward's own operations in the same order, and the first kept
candidate's features are compared with the tail's own forward bit for bit; on any difference the
cache turns itself off for the run (recorded). Merging is incremental too: blocks whose
coefficients equal the kept candidate's reuse its merged tensors (each block is merged on its own,
so the values are the same). A candidate marked ``anchor`` is kept (the latest one); any later
candidate without a gradient, on the same inputs (exact equality), starts from the first stage
whose parameters differ; anything else takes the full forward. On the embedded default a probe
costs 0.42 of a full forward on average over the 30 blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from harness.composition import functional_forward
from harness.sources.clip import vit_stages


def stages_of(tail: nn.Module) -> list | None:
    """``(parameter name prefixes, step)`` per stage of ``tail``, or None when it is not a known chain."""
    return tail.stages() if hasattr(tail, "stages") else vit_stages(tail)


@dataclass
class _Kept:
    params: dict[str, Tensor]
    lam: Tensor
    x: Tensor
    traces: list  # per chunk: the state entering every stage
    z: Tensor
    amp: object


class _Chain(nn.Module):
    """The tail run stage by stage on each chunk's state from stage ``start``, recording the
    states entering each stage into ``traces``: one parameter swap for every chunk."""

    def __init__(self, tail: nn.Module):
        super().__init__()
        self.tail = tail

    def forward(self, states: list, start: int, traces: list | None = None) -> list:
        steps = [step for _, step in stages_of(self.tail)][start:]
        outs = []
        for k, state in enumerate(states):
            for step in steps:
                if traces is not None:
                    traces[k].append(state)
                state = step(state)
            outs.append(state)
        return outs


class PrefixCache:
    """The kept candidate of one engine and the reuse of its activations (see the module)."""

    def __init__(self, source, comp):
        self.source, self.comp = source, comp
        self.stages = None
        stages = None if source.linearized else stages_of(source.tail)
        if stages is not None:
            names = [n for n, _ in source.tail.named_parameters()]
            owned = [[n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)]
                     for prefixes, _ in stages]
            # Only where every composed parameter belongs to a stage: otherwise a change could go unseen.
            if set().union(*map(set, owned)) >= set(source.base):
                self.stages = owned
        self._chain = _Chain(source.tail)
        self.kept: _Kept | None = None
        self.checked = False
        self.stats = {"kept": 0, "reused": 0, "stages_skipped": 0, "stages": len(self.stages or ())}

    @property
    def enabled(self) -> bool:
        return self.stages is not None

    def _run(self, params, states, start, traces=None) -> Tensor:
        outs = functional_forward(self._chain, {f"tail.{n}": v for n, v in params.items()}, states, start, traces)
        outs = [o.float() for o in outs]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def merge(self, x) -> dict[str, Tensor]:
        """The merged parameters of coefficients ``x`` (no gradient), reusing the kept ones per block."""
        k = self.kept
        if k is None:
            return self.comp.merge(x)
        return self.comp.merge(x, like=(k.lam, k.params))

    def keep(self, params: dict[str, Tensor], lam: Tensor, x: Tensor, amp) -> Tensor:
        """The features of ``x`` in full, keeping the state entering every stage."""
        chunks = list(self.source.prepared_chunks(x))
        traces = [[] for _ in chunks]
        z = self._run(params, chunks, 0, traces)
        if not self.checked:  # once: the chain must be the tail's own forward, bit for bit
            self.checked = True
            ref = self.source.features(params, x).float()
            if not torch.equal(z, ref):
                self.stages, self.stats["off"] = None, "the staged forward differs from the tail's"
                return ref
        self.kept = _Kept(dict(params), lam, x, traces, z, amp)
        self.stats["kept"] += 1
        return z

    def first_changed(self, params: dict[str, Tensor]) -> int:
        """The first stage whose parameters differ from the kept ones (the number of stages: none)."""
        kept = self.kept.params

        def changed(n):
            a, b = params.get(n), kept.get(n)
            return (a is None) != (b is None) or (a is not None and a is not b and not torch.equal(a, b))
        for s, names in enumerate(self.stages):
            if any(map(changed, names)):
                return s
        return len(self.stages)

    def reuse(self, params: dict[str, Tensor], x: Tensor, amp) -> Tensor | None:
        """The features of ``x`` from the kept state, or None where that is not possible."""
        k = self.kept
        if k is None or k.amp != amp or x.shape != k.x.shape or x.dtype != k.x.dtype or not torch.equal(x, k.x):
            return None
        s = self.first_changed(params)
        if s == 0:
            return None
        self.stats["reused"] += 1
        self.stats["stages_skipped"] += s
        if s == len(self.stages):
            return k.z.clone()
        return self._run(params, [t[s] for t in k.traces], s)
