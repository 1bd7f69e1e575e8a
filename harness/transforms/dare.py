"""DARE (Yu et al. 2024) as a task-vector transform."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.api import Transform, option
from harness.transforms.common import task_seed


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
            gen = torch.Generator().manual_seed(task_seed(seed, i))
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
