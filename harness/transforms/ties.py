"""TIES-Merging (Yadav et al. 2023) as a task-vector transform."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from harness.api import HarnessError, Transform, option
from harness.transforms.common import stack, trim_threshold


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
            t = stack(task_vectors, k)
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
