"""What a task returns when a searcher asks for a candidate's outputs, and the loss they give.

Searchers that model the network's outputs rather than its loss (:mod:`searchers.dfo_gn`) ask
for ``Candidate(outputs=True)``; tasks whose ``returns_outputs`` is true answer with an
:class:`Outputs` beside the loss. The loss is recomputed here from (modelled) logits exactly as the
task computes it from the real ones, so a model of the logits is a model of the loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Outputs:
    """A candidate's per-sample outputs on the whole search set and how its loss follows from them.

    One entry per part of the set (a data set): the logits ``(n, classes)``, the labels ``(n,)``
    and the sample weights ``(n,)``. The loss is ``Σ_parts Σ_i w_i·ℓ_i / Σ w``, where ``ℓ_i`` is the
    cross-entropy, or for a part with a ``cap`` (negation's forgetting term) ``−min(CE, cap)``, or
    for a part whose labels are None the squared norm of the row (least squares: residuals);
    each ``(part, level, weight)`` of ``floors`` adds ``weight × max(0, level − accuracy of part)``
    (negation's control-accuracy floor: piecewise constant, so it has no gradient).
    """

    logits: list[np.ndarray]
    labels: list[np.ndarray | None]
    weights: list[np.ndarray]
    caps: list[float | None] = field(default_factory=list)
    floors: list[tuple[int, float, float]] = field(default_factory=list)

    def flat(self) -> np.ndarray:
        """Every logit in one float64 vector (the parts' logits raveled and concatenated)."""
        return np.concatenate([np.asarray(z, dtype=np.float64).ravel() for z in self.logits])

    def loss(self, flat):
        """The loss of logits given as a (batch of) flat vector(s) laid out as :meth:`flat`
        (a torch tensor ``(..., total)``; differentiable): the task's loss formula."""
        import torch
        import torch.nn.functional as F

        caps = self.caps or [None] * len(self.logits)
        total, start, accs = 0, 0, []
        wsum = float(sum(np.sum(w) for w in self.weights))
        for z, y, w, cap in zip(self.logits, self.labels, self.weights, caps):
            n, k = np.shape(z)
            part = flat[..., start:start + n * k].reshape(*flat.shape[:-1], n, k)
            start += n * k
            # Copies: arrays that came back from a Ray worker are read-only, which torch warns about.
            wt = torch.as_tensor(np.array(w), dtype=flat.dtype)
            if y is None:  # residuals
                total = total + ((part ** 2).sum(-1) * wt).sum(-1)
                accs.append(None)
                continue
            yt = torch.as_tensor(np.array(y), dtype=torch.long).expand(*part.shape[:-1])
            ce = -part.log_softmax(-1).gather(-1, yt.unsqueeze(-1)).squeeze(-1)
            if cap is not None:
                ce = -ce.clamp(max=cap)
            total = total + (ce * wt).sum(-1)
            accs.append(((part.argmax(-1) == yt).to(flat.dtype) * wt).sum(-1) / max(float(np.sum(w)), 1e-12))
        total = total / max(wsum, 1e-12)
        for part, level, weight in self.floors:
            total = total + weight * (level - accs[part]).clamp(min=0).detach()
        return total
