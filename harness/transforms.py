"""Task-vector transforms: the data-free merging methods the field reports, as rewrites of the task
vectors before they are composed (``-t transform=NAME[:key=value,...]``).

A transform maps the T task vectors of a run to the vectors the run composes instead, such that
their *plain sum* is the method's merged task vector. Task arithmetic over the transformed vectors
(``α·1``, the ``ties``/``dare``/``iso`` baseline searchers) is then the classic method, and every
other searcher learns anisotropic coefficients over them (aTLAS on TIES vectors, AdaMerging++).

- ``ties`` (Yadav et al. 2023): trim, elect, disjoint merge. See :class:`Ties`.
- ``dare`` (Yu et al. 2024): drop each entry with probability ``p``, rescale by ``1/(1-p)``.
- ``iso`` (Iso-C, Marczak et al. 2025): per matrix, the SVD of Σ τ_i with a flat spectrum.

Transforms work on the CPU in fp32 when the task is prepared, once per run, before the engine
moves anything to the run's device.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

import harness.registry as registry
from harness.api import HarnessError, Transform, option
from harness.config import resolve_options


def parse(spec: str) -> tuple[str, dict[str, str]]:
    """``"ties:k=0.1,merge=sum"`` → ``("ties", {"k": "0.1", "merge": "sum"})``."""
    name, _, rest = str(spec).strip().partition(":")
    given = {}
    for pair in [p for p in rest.split(",") if p.strip()]:
        k, sep, v = pair.partition("=")
        if not sep or not k.strip():
            raise HarnessError(f"bad transform option {pair!r} in {spec!r}: expected NAME:key=value,key=value")
        given[k.strip()] = v.strip()
    if not name.strip():
        raise HarnessError(f"transform {spec!r} has no name; valid: {', '.join(registry.names('transform'))}")
    return name.strip(), given


def resolve(spec: str):
    """``(transform class, its typed, validated Options)`` for a spec; raises HarnessError."""
    name, given = parse(spec)
    cls = registry.load("transform", name)
    opts = resolve_options(cls, given, f"transform '{name}'")
    registry.validate("transform", cls, opts)
    return cls, opts


def canonical(spec: str) -> str:
    """The spec as it is recorded: the name, then the options that differ from their defaults,
    sorted (``ties:merge=sum``), so equal transforms written differently are one run identity."""
    if not spec:
        return ""
    name, _ = parse(spec)
    cls, opts = resolve(spec)
    default = cls.Options()
    changed = [f"{f.name}={_text(getattr(opts, f.name))}" for f in dataclasses.fields(opts)
               if getattr(opts, f.name) != getattr(default, f.name)]
    return name + (":" + ",".join(sorted(changed)) if changed else "")


def _text(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def load(spec: str) -> Transform:
    cls, opts = resolve(spec)
    return cls(opts)


def _stack(tvs: list[dict[str, Tensor]], key: str) -> Tensor:
    return torch.stack([tv[key].detach().float() for tv in tvs])


def trim_threshold(tensors: list[Tensor], k: float) -> Tensor:
    """The magnitude at or above which an entry is among the largest fraction ``k`` of the entries
    of ``tensors`` taken together: the (d − ⌊k·d⌋)-th smallest of the d magnitudes, so entries
    tied with it are all kept; 0 (keep everything) when that rank is 0."""
    mags = torch.cat([t.detach().reshape(-1).float().abs() for t in tensors])
    drop = mags.numel() - int(mags.numel() * k)
    return torch.kthvalue(mags, drop).values if drop > 0 else torch.tensor(0.0)


class Ties(Transform):
    """TIES-Merging: trim each task vector to its ``k`` largest magnitudes, elect one sign per entry
    (the sign of the sum of the trimmed values), keep only the entries that agree with it.

    ``scope=global`` ranks magnitudes over the whole flattened task vector (FusionBench's
    ``topk_values_mask``), ``scope=tensor`` within each block. ``merge`` says what the transformed
    vectors sum to: ``mean`` (the paper) divides each kept entry by the number of task vectors that
    kept that entry, ``sum`` (FusionBench's default) leaves them as they are, ``max`` keeps only the
    agreeing entry of largest magnitude (the first task on a tie). Tie rule: an entry whose summed
    trimmed value is exactly 0 takes the majority sign, the sign of the sum of all elected signs
    (over the whole vector for ``scope=global``, within the block for ``scope=tensor``); if that is
    0 too, the entry keeps its negative trimmed values (``sum``, ``mean``) or nothing (``max``),
    as FusionBench's ``disjoint_merge`` does. ``exclude`` (a regular expression) leaves the
    matching blocks out of the ranking and the election and passes them through unchanged: with
    Hugging Face ``CLIPVisionModel`` checkpoints, ``exclude=^proj$`` leaves out the visual
    projection they do not have (an all-zero block here), so the global top-k counts the same
    entries as FusionBench.
    """

    name = "ties"
    description = "TIES-Merging: trim to the top-k magnitudes, elect a sign per entry, keep agreeing entries"

    @dataclass
    class Options:
        k: float = option(0.2, "fraction of each task vector's entries kept, by magnitude", gt=0, le=1)
        scope: str = option("global", "rank magnitudes over the whole task vector (global) or within each block "
                                      "(tensor)", choices=("global", "tensor"))
        merge: str = option("mean", "what the vectors sum to, per entry: the mean of the values agreeing with the "
                                    "elected sign (the paper), their sum (FusionBench), or the largest of them",
                            choices=("mean", "sum", "max"))
        exclude: str = option("", "regular expression of blocks left out of trimming and election, passed through "
                                  "unchanged (empty: none)")

    @classmethod
    def validate(cls, options):
        try:
            re.compile(options.exclude)
        except re.error as e:
            raise HarnessError(f"transform ties: exclude is not a regular expression ({e}): {options.exclude!r}") from None

    def apply(self, task_vectors, names, seed):
        o = self.options
        keys = [k for k in task_vectors[0] if not (o.exclude and re.search(o.exclude, k))]
        if not keys:
            raise HarnessError(f"transform ties: exclude={o.exclude!r} leaves out every block; nothing to merge")
        if o.scope == "global":
            limits = [{k: thr for k in keys} for thr in (trim_threshold([tv[k] for k in keys], o.k) for tv in task_vectors)]
        else:
            limits = [{k: trim_threshold([tv[k]], o.k) for k in keys} for tv in task_vectors]

        def trimmed(k):  # (T, *shape): each task vector's entries at or above its threshold
            t = _stack(task_vectors, k)
            return t * (t.abs() >= torch.stack([lim[k] for lim in limits]).view(-1, *[1] * (t.dim() - 1)))

        # Pass 1: the elected sign per entry (int8), and the majority sign for entries summing to 0.
        signs = {k: torch.sign(trimmed(k).sum(0)).to(torch.int8) for k in keys}
        if o.scope == "global":
            total = torch.sign(sum(s.sum(dtype=torch.int64) for s in signs.values()))
            majority = {k: total for k in keys}
        else:
            majority = {k: torch.sign(s.sum(dtype=torch.int64)) for k, s in signs.items()}
        # Pass 2: keep the agreeing entries and weight them so the vectors sum to the merge.
        out = [{k: v.detach().float().clone() for k, v in tv.items() if k not in keys} for tv in task_vectors]
        zero_signs = kept = total_n = 0
        for k in keys:
            t, s = trimmed(k), signs.pop(k).float()
            zero_signs += int(((s == 0) & (t != 0).any(0)).sum())  # trimmed values that cancel exactly
            s = torch.where(s == 0, majority[k].float(), s)
            agree = torch.where(s > 0, t > 0, t < 0)  # sign still 0: the negative entries (FusionBench's rule)
            if o.merge == "max":
                agree &= s != 0  # FusionBench multiplies the max by the sign, 0
            t = t * agree
            if o.merge == "mean":
                t = t / agree.sum(0).clamp(min=1)
            elif o.merge == "max":
                winner = t.abs().argmax(0, keepdim=True)
                t = t * (torch.arange(len(t)).view(-1, *[1] * (t.dim() - 1)) == winner)
            kept += int((t != 0).sum())
            total_n += t.numel()
            for i in range(len(out)):
                out[i][k] = t[i].clone()
        out = [{k: o_[k] for k in task_vectors[0]} for o_ in out]  # the blocks in their own order
        return out, list(names), {"kept_fraction": kept / max(total_n, 1), "zero_sign_entries": zero_signs,
                                  "excluded_blocks": len(task_vectors[0]) - len(keys)}


def _seed(seed: int, i: int) -> int:
    """A generator seed for task vector ``i`` of a run with ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([int(seed) % 2**32, 0xDA4E, i]).generate_state(1)[0])


class Dare(Transform):
    """DARE: drop each entry of each task vector with probability ``p`` and (``rescale``) multiply
    the survivors by 1/(1−p), so the expected task vector is unchanged. The masks are drawn from a
    generator seeded by the run seed and the task vector's position (never torch's global
    generator), block by block in order: the same seed gives the same masks on any device.
    ``matrices_only`` drops entries of 2-D weights only (FusionBench's ``only_on_linear_weights``
    restricts it to ``nn.Linear`` weights; in a ViT those are the 2-D weights but the positional
    embedding and projections)."""

    name = "dare"
    description = "DARE: drop entries with probability p, rescale survivors by 1/(1-p) (seeded by the run)"

    @dataclass
    class Options:
        p: float = option(0.5, "drop probability of each entry", ge=0, lt=1)
        rescale: bool = option(True, "multiply the kept entries by 1/(1-p), so the expected task vector is unchanged")
        matrices_only: bool = option(False, "drop entries of 2-D weights only (other blocks pass through unchanged)")

    def apply(self, task_vectors, names, seed):
        o = self.options
        scale = 1.0 / (1.0 - o.p) if o.rescale else 1.0
        out, kept, total = [], 0, 0
        for i, tv in enumerate(task_vectors):
            gen = torch.Generator().manual_seed(_seed(seed, i))
            new = {}
            for k, v in tv.items():
                v = v.detach().float()
                if o.matrices_only and v.dim() != 2:
                    new[k] = v.clone()
                    continue
                keep = torch.rand(v.shape, generator=gen) > o.p
                kept += int(keep.sum())
                total += keep.numel()
                new[k] = v * keep * scale
            out.append(new)
        return out, list(names), {"kept_fraction": kept / max(total, 1)}


class IsoC(Transform):
    """Iso-C: for each weight matrix, the sum Σ_i τ_i with its singular values all replaced by their
    mean (U · mean(σ) · Vᵀ), a flat spectrum; the other blocks are combined as ``other`` says
    (``sum``, as task arithmetic does; ``mean``, as FusionBench's ``iso_c`` does). ``conv=matrix``
    treats a weight of more than 2 dimensions (a convolution kernel) as the matrix (out, rest);
    ``conv=other`` combines it like a 1-D block (FusionBench). Returns one vector, ``iso``."""

    name = "iso"
    description = "Iso-C: per weight matrix, the sum of task vectors with a flat singular spectrum"

    @dataclass
    class Options:
        other: str = option("sum", "how the blocks that are not matrices combine: sum (task arithmetic) or mean "
                                   "(FusionBench)", choices=("sum", "mean"))
        conv: str = option("matrix", "weights of more than 2 dimensions: flattened to matrices (out, rest), or "
                                     "combined like the other blocks", choices=("matrix", "other"))

    def apply(self, task_vectors, names, seed):
        o, T = self.options, len(task_vectors)
        out, matrices = {}, 0
        for k in task_vectors[0]:
            total = _stack(task_vectors, k).sum(0)
            if total.dim() == 2 or (total.dim() > 2 and o.conv == "matrix"):
                out[k] = flat_spectrum(total)
                matrices += 1
            else:
                out[k] = total / T if o.other == "mean" else total
        return [out], ["iso"], {"matrices": matrices, "other_blocks": len(out) - matrices, "merged": T}


def flat_spectrum(m: Tensor) -> Tensor:
    """``m`` (2-D, or reshaped to (shape[0], -1)) with every singular value set to their mean."""
    shape = m.shape
    x = m.reshape(shape[0], -1)
    if not torch.isfinite(x).all():
        raise HarnessError(f"transform iso: a summed task vector of shape {tuple(shape)} holds non-finite "
                           "values (task vectors too large to add up); check the checkpoints")
    try:
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
    except RuntimeError as e:  # torch.linalg.LinAlgError: the SVD did not converge
        raise HarnessError(f"transform iso: the SVD of a summed task vector of shape {tuple(shape)} failed "
                           f"({str(e).splitlines()[0]}); check the checkpoints for extreme values") from None
    out = (s.mean() * (u @ vh)).reshape(shape)
    if not torch.isfinite(out).all():
        raise HarnessError(f"transform iso: the flattened spectrum of a task vector of shape {tuple(shape)} is "
                           "not finite (singular values too large); check the checkpoints for extreme values")
    return out
