"""The ``lora:R[:ALPHA]`` coefficient space: low-rank adaptation (Hu et al., ICLR 2022) as a
parameter-efficient fine-tuning baseline beside aTLAS×K (the paper's Table 17).

Every weight matrix of the composed tail (a block whose name ends in ``weight`` with two or more
dimensions; a convolution kernel ``(out, in, kh, kw)`` counts as the matrix ``(out, in·kh·kw)``)
gets ``ΔW = (α / r) · B · A`` with ``A`` (r × in) and ``B`` (out × r), ``r = min(R, out, in)``.
``A = A0 + x_A`` starts at a fixed random matrix ``A0`` (uniform in ±1/√in, seeded, the usual
LoRA initialisation) and ``B = x_B`` at zero, so the start point ``x = 0`` is the pre-trained model
and the gradient with respect to ``B`` is not zero there. ``α`` defaults to ``R`` (scale 1). No
task vector takes part: the coordinates *are* the adapter's parameters, so their number is the
baseline's parameter count. The merged weights equal the unmerged LoRA forward ``W x + s B A x``
(the form peft computes), because the forward is linear in the weight.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from harness.api import HarnessError


def lora_blocks(blocks: list[str], base: dict[str, Tensor]) -> list[int]:
    """Indices of the blocks LoRA adapts: weights with two or more dimensions."""
    return [b for b, name in enumerate(blocks) if name.split(".")[-1].endswith("weight") and base[name].dim() >= 2]


class LoraFactors:
    """The ``A0`` matrices, shapes and offsets of one ``lora`` space over a composition's blocks."""

    def __init__(self, blocks: list[str], base: dict[str, Tensor], rank: int, alpha: float | None, seed: int):
        if rank < 1:
            raise HarnessError(f"lora rank must be >= 1, got {rank}")
        self.index = lora_blocks(blocks, base)
        if not self.index:
            raise HarnessError("the lora space adapts weight matrices, but none of the composed blocks is one; "
                               "use another --space")
        self.rank, self.scale = rank, (float(alpha) if alpha is not None else float(rank)) / rank
        gen = torch.Generator().manual_seed(int(seed) * 7919 + 17)
        self.shapes, self.ranks, self.a0, offsets, self.labels = [], [], [], [0], []
        for b in self.index:
            name = blocks[b]
            out = base[name].shape[0]
            inn = base[name].numel() // out
            r = min(rank, out, inn)
            bound = 1.0 / math.sqrt(inn)
            self.a0.append((torch.rand(r, inn, generator=gen) * 2 - 1) * bound)
            self.shapes.append((out, inn))
            self.ranks.append(r)
            offsets.append(offsets[-1] + r * inn + out * r)
            self.labels += [f"{name}.A[{i}]" for i in range(r * inn)] + [f"{name}.B[{i}]" for i in range(out * r)]
        self.offsets = offsets
        self.dim = offsets[-1]

    def deltas(self, x: Tensor) -> list[Tensor]:
        """``(α/r)·B·A`` of every adapted block, as flat matrices (out × in), in :attr:`index` order."""
        out = []
        for j, ((o, i), r) in enumerate(zip(self.shapes, self.ranks)):
            s = self.offsets[j]
            a = x[s:s + r * i].view(r, i) + self.a0[j].to(device=x.device, dtype=x.dtype)
            bmat = x[s + r * i:self.offsets[j + 1]].view(o, r)
            out.append(self.scale * (bmat @ a))
        return out

    def to(self, device) -> "LoraFactors":
        self.a0 = [a.to(device) for a in self.a0]
        return self
