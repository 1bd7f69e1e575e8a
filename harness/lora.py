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

import numpy as np
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

    def factors(self, x: Tensor, blocks: list[str]) -> dict[str, tuple[Tensor, Tensor]]:
        """``{block name: (A, (α/r)·B)}`` at ``x``, detached: the adapter as LoRA task-vector factors
        for :class:`FactorComposition` (their product is the block's update as a flat matrix)."""
        out = {}
        for j, ((o, i), r) in enumerate(zip(self.shapes, self.ranks)):
            s = self.offsets[j]
            a = x[s:s + r * i].view(r, i) + self.a0[j].to(device=x.device, dtype=x.dtype)
            out[blocks[self.index[j]]] = (a.detach().clone(), self.scale * x[s + r * i:self.offsets[j + 1]].view(o, r).detach())
        return out

    def to(self, device) -> "LoraFactors":
        self.a0 = [a.to(device) for a in self.a0]
        return self


class FactorComposition:
    """LoRA task vectors composed in factor form (the paper's Table 4, LoRAs as task vectors): each
    adapted weight's update is the product of the composed factors,

        ΔW_b = (Σ_t λ^B_{t,b} B_{t,b}) · (Σ_t λ^A_{t,b} A_{t,b}),     λ^A = 1 + x_A,  λ^B = x_B,

    with ``B`` carrying each adapter's α/r, so A and B are scaled separately and task vectors
    interact through their cross terms B_s A_t, where the dense form θ0 + Σ λ (α/r) B_t A_t cannot.
    ``x = 0`` is the pre-trained model (ΔW = 0 · ΣA) with a non-zero gradient in x_B, as LoRA starts
    (A non-zero, B zero); ``one_hot(i)`` is adapter i alone. Blocks no adapter touches keep θ0.

    The same interface as :class:`harness.composition.Composition` for the engines (``merge``,
    ``coefficients``, ``dim``, ``labels``, ``to``); spaces ``per_block`` (2 per task and block its
    adapter touches) and ``per_layer`` (2 per task and layer its adapter touches). Only the factors
    are stored, r·(out + in) numbers per adapted matrix instead of out·in.

    Args:
        base: pre-trained state dict (its floating entries are the blocks).
        factors: per task ``{block name: (A (r × in), B (out × r))}``, B scaled by α/r (a convolution
            kernel as (out, in·kh·kw)); ranks and adapted blocks may differ between tasks.
    """

    SPACES = ("per_block", "per_layer")

    def __init__(self, base: dict[str, Tensor], factors: list[dict[str, tuple[Tensor, Tensor]]],
                 task_names: list[str], space: str = "per_block", dtype: torch.dtype = torch.float32,
                 seed: int = 0, layer_fn=None):
        from harness.spaces import layer_of
        if space not in self.SPACES:
            raise HarnessError(f"LoRA task vectors in factor form compose in {' or '.join(self.SPACES)}, not {space!r}")
        if len(factors) != len(task_names) or not factors:
            raise HarnessError(f"{len(factors)} LoRA task vectors for {len(task_names)} names")
        self.space = self.kind = space
        self.K, self.seed, self.dtype = 1, seed, dtype
        self.task_names, self.T = [str(n) for n in task_names], len(task_names)
        self.compute_dtype = torch.promote_types(torch.float32, dtype)
        self.blocks = [k for k, v in base.items() if v.is_floating_point()]
        self.B = len(self.blocks)
        self.base = {k: base[k].detach().to(self.compute_dtype) for k in self.blocks}
        names = set().union(*(f.keys() for f in factors))
        self.index = [b for b, k in enumerate(self.blocks) if k in names]
        if len(self.index) != len(names):
            raise HarnessError(f"LoRA factors name blocks the base model lacks: {sorted(names - set(self.blocks))[:2]}")
        # Adapters of different ranks, or of different blocks, compose after zero-padding: each A to
        # (r_max, in) with zero rows and each B to (out, r_max) with zero columns, a block an adapter
        # leaves alone as zero factors. Padding changes no adapter's B·A; the cross term of adapters
        # of ranks r_s and r_t is then B_s[:, :r] A_t[:r] with r = min(r_s, r_t).
        self.A, self.Bm, adapts = [], [], torch.zeros(self.T, len(self.index), dtype=torch.bool)
        for j, b in enumerate(self.index):
            k = self.blocks[b]
            out, inn = self.base[k].shape[0], self.base[k].numel() // self.base[k].shape[0]
            pairs = [f.get(k) for f in factors]
            for t, pair in enumerate(pairs):
                if pair is None:
                    continue
                a, bm = pair
                if a.dim() != 2 or a.shape[1] != inn or a.shape[0] < 1 or tuple(bm.shape) != (out, a.shape[0]):
                    raise HarnessError(f"LoRA factors of '{k}' in '{self.task_names[t]}' have shapes A {tuple(a.shape)}, "
                                       f"B {tuple(bm.shape)}; expected A (r, {inn}) and B ({out}, r) for a rank r >= 1")
                adapts[t, j] = True
            r = max(p[0].shape[0] for p in pairs if p is not None)
            a_pad = torch.zeros(self.T, r, inn, dtype=dtype)
            b_pad = torch.zeros(self.T, out, r, dtype=dtype)
            for t, pair in enumerate(pairs):
                if pair is not None:
                    a_pad[t, :pair[0].shape[0]] = pair[0].detach().to(dtype)
                    b_pad[t, :, :pair[0].shape[0]] = pair[1].detach().to(dtype)
            self.A.append(a_pad)
            self.Bm.append(b_pad)
        adapted = [self.blocks[b] for b in self.index]
        if space == "per_layer":
            layers = [(layer_fn or layer_of)(k) for k in adapted]
            self.groups = list(dict.fromkeys(layers))
            self._group = torch.tensor([self.groups.index(g) for g in layers])
        else:
            self.groups, self._group = adapted, torch.arange(len(adapted))
        # A coefficient pair exists only where the task's adapter touches the group: a pair with
        # nothing to scale would be a dead dimension for a black-box searcher.
        self.live = torch.zeros(self.T, len(self.groups), dtype=torch.bool)
        self.live.index_put_((torch.arange(self.T)[:, None], self._group[None, :].expand(self.T, -1)), adapts, accumulate=True)
        self.dim = int(self.live.sum()) * 2
        self.labels = [f"{t}/{g}.{f}" for i, t in enumerate(self.task_names) for j, g in enumerate(self.groups)
                       if self.live[i, j] for f in "AB"]

    def __repr__(self) -> str:
        return f"FactorComposition(T={self.T}, adapted={len(self.index)}, space={self.space!r}, dim={self.dim})"

    def coefficients(self, x) -> Tensor:
        """(T, B, 2): λ^A and λ^B of every block (0 where the task's adapter does not touch it). Differentiable."""
        if not isinstance(x, Tensor):
            x = torch.as_tensor(np.asarray(x, dtype=np.float32))
        if x.numel() != self.dim:
            raise HarnessError(f"coefficient vector has {x.numel()} entries, the space {self.space!r} has {self.dim}")
        x = x.reshape(-1, 2).to(device=self.A[0].device, dtype=self.compute_dtype)
        full = x.new_zeros(self.T, len(self.groups), 2)
        full[self.live.to(x.device)] = x + torch.tensor([1.0, 0.0], device=x.device, dtype=x.dtype)
        lam = x.new_zeros(self.T, self.B, 2)
        lam[:, self.index] = full[:, self._group.to(x.device)]
        return lam

    def merge(self, x, like: tuple | None = None) -> dict[str, Tensor]:
        """θ0 + (Σ λ^B B)(Σ λ^A A) on every adapted block, θ0 elsewhere; ``like`` as in
        :meth:`harness.composition.Composition.merge` (blocks whose λ are unchanged reuse its tensors)."""
        lam = self.coefficients(x)
        merged = dict(self.base)
        for j, b in enumerate(self.index):
            name = self.blocks[b]
            if like is not None and torch.equal(lam[:, b], like[0][:, b]):
                merged[name] = like[1][name]
                continue
            a = torch.tensordot(lam[:, b, 0], self.A[j].to(self.compute_dtype), dims=1)
            bm = torch.tensordot(lam[:, b, 1], self.Bm[j].to(self.compute_dtype), dims=1)
            merged[name] = self.base[name] + (bm @ a).view(self.base[name].shape)
        return merged

    def isotropic(self, alpha: float) -> np.ndarray:
        """λ^A = 1, λ^B = α: ΔW = α (Σ B)(Σ A), task arithmetic at α for one task vector."""
        x = np.zeros((self.T, len(self.groups), 2))
        x[..., 1] = alpha
        return x[self.live.numpy()].reshape(-1)

    def one_hot(self, i: int) -> np.ndarray:
        """Adapter ``i`` alone: λ^A = λ^B = 1 for task i, 0 for the others."""
        if not 0 <= i < self.T:
            raise HarnessError(f"task index {i} out of range: there are {self.T} task vectors")
        x = np.zeros((self.T, len(self.groups), 2))
        x[:, :, 0] = -1.0
        x[i] = (0.0, 1.0)
        return x[self.live.numpy()].reshape(-1)

    def expand(self, x) -> np.ndarray:
        with torch.no_grad():
            lam = self.coefficients(x.detach() if isinstance(x, Tensor) else x)
        return lam.cpu().numpy().astype(np.float64).copy()

    def memory_bytes(self) -> int:
        """Bytes held by the stored factors."""
        return sum(t.numel() * t.element_size() for t in self.A + self.Bm)

    def select(self, keep):
        raise HarnessError("block selection (-t select) is for dense task vectors; LoRA factors are small already")

    def to(self, device) -> "FactorComposition":
        self.base = {k: v.to(device) for k, v in self.base.items()}
        self.A, self.Bm = [a.to(device) for a in self.A], [b.to(device) for b in self.Bm]
        return self
