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

Batched probes (:meth:`PrefixCache.reuse_batch`): candidates scored together (``--batch-size``)
that each change the parameters of one stage only run that stage one by one from the kept state,
then share one pass through the stages after it, which hold the kept parameters: their states are
concatenated along the batch, up to a chunk's worth of images per pass. This removes the per-call
overhead that dominates a probe on few images, and fills a GPU. A batch of other shapes gives the
same values only up to float rounding, so the first batched pass is compared with the one-by-one
path (relative difference at most 1e-4) and on a larger difference batching turns itself off
for the run (recorded), as it does when a pass fails. A tail's ``stages()`` states must hold the
images along their first dimension (a tensor, or a tuple of tensors and None) to be batched.
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

    def forward(self, states: list, start: int, traces: list | None = None, stop: int | None = None) -> list:
        steps = [step for _, step in stages_of(self.tail)][start:stop]
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
        # Whether every stage's state has the images along its first dimension (batched probes).
        blocks = getattr(getattr(source.tail, "transformer", None), "resblocks", None)
        self.batchable = hasattr(source.tail, "stages") or (
            blocks is not None and getattr(source.tail.transformer, "batch_first", True))
        self.batch_checked = False

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

    def first_changed(self, params: dict[str, Tensor], last: bool = False):
        """The first stage whose parameters differ from the kept ones (the number of stages: none);
        with ``last``, ``(first, last)`` changed stages."""
        kept = self.kept.params

        def changed(n):
            a, b = params.get(n), kept.get(n)
            return (a is None) != (b is None) or (a is not None and a is not b and not torch.equal(a, b))
        hits = [s for s, names in enumerate(self.stages) if any(map(changed, names))]
        first = hits[0] if hits else len(self.stages)
        return (first, hits[-1] if hits else first) if last else first

    def _same_inputs(self, x: Tensor, amp) -> bool:
        k = self.kept
        return (k is not None and k.amp == amp and x.shape == k.x.shape and x.dtype == k.x.dtype
                and torch.equal(x, k.x))

    def reuse_batch(self, params: list[dict[str, Tensor]], x: Tensor, amp, images: int) -> list:
        """Features of ``x`` for several parameter sets, or None for each that cannot be batched
        (see the module): each changes the stages from its first changed one, all sharing later
        passes of at most ``images`` images (at least one candidate per pass)."""
        out: list = [None] * len(params)
        if not self._same_inputs(x, amp) or not self.batchable:
            return out
        k, groups = self.kept, {}
        for i, p in enumerate(params):
            first, last = self.first_changed(p, last=True)
            if first == len(self.stages):
                out[i] = k.z.clone()
            elif first == last and first > 0:
                groups.setdefault(first, []).append(i)
        try:
            self._passes(params, groups, out, max(1, images // max(len(x), 1)))
        except RuntimeError as e:  # e.g. a tail whose states do not hold the images first: one by one
            self.batchable, self.stats["batch_off"] = False, f"shared passes failed: {type(e).__name__}: {e}"[:200]
            return [None] * len(params)
        for i in range(len(out)):
            if out[i] is not None:
                out[i] = torch.cat(out[i]) if isinstance(out[i], list) else out[i]
                self.stats["reused"] += 1
        if not self.batch_checked:
            self._check_batch(params, out, x, amp)
        return out

    def _passes(self, params, groups: dict, out: list, per: int) -> None:
        """Each group's candidates (changing stage s only), ``per`` at a time: stage s alone per
        candidate, then the later stages once for all of them; features appended to ``out``."""
        k = self.kept
        for s, idx in groups.items():
            for lo in range(0, len(idx), per):
                part = idx[lo:lo + per]
                after = [self._run_stage(params[i], [t[s] for t in k.traces], s) for i in part]
                n = [len(_first(st)) for st in after[0]]  # images of each chunk
                joined = [_cat([a[c] for a in after]) for c in range(len(n))]
                zs = functional_forward(self._chain, {f"tail.{m}": v for m, v in k.params.items()}, joined, s + 1)
                for c, z in enumerate(zs):  # chunk c holds each candidate's n[c] images in turn
                    for j, i in enumerate(part):
                        out[i] = (out[i] or []) + [z[j * n[c]:(j + 1) * n[c]].float()]
                self.stats["batched"] = self.stats.get("batched", 0) + 1
                self.stats["stages_skipped"] += s * len(part)

    def _run_stage(self, params, states, s) -> list:
        return functional_forward(self._chain, {f"tail.{n}": v for n, v in params.items()}, states, s, None, s + 1)

    def _check_batch(self, params, out, x, amp) -> None:
        """Once: the first batched candidate against the one-by-one path; off past rounding."""
        for p, z in zip(params, out):
            s = self.first_changed(p)
            if z is None or s == len(self.stages):
                continue
            self.batch_checked = True
            ref = self._run(p, [t[s] for t in self.kept.traces], s)
            if float((z - ref).abs().max()) > 1e-4 * max(float(ref.abs().max()), 1e-12):
                self.batchable, self.stats["batch_off"] = False, "batched probes differ from the one-by-one path"
                out[:] = [None] * len(out)
            return

    def reuse(self, params: dict[str, Tensor], x: Tensor, amp) -> Tensor | None:
        """The features of ``x`` from the kept state, or None where that is not possible."""
        k = self.kept
        if not self._same_inputs(x, amp):
            return None
        s = self.first_changed(params)
        if s == 0:
            return None
        self.stats["reused"] += 1
        self.stats["stages_skipped"] += s
        if s == len(self.stages):
            return k.z.clone()
        return self._run(params, [t[s] for t in k.traces], s)


def _first(state) -> Tensor:
    """The first tensor of a stage's state (a tensor, or a tuple with tensors and None)."""
    return state[0] if isinstance(state, tuple) else state


def _cat(states: list):
    """Several candidates' states of one chunk, joined along the images."""
    if isinstance(states[0], tuple):
        return tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*states))
    return torch.cat(states)
