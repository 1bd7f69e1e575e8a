"""Task vectors, coefficient spaces and the functional merge of aTLAS (arXiv 2407.02880, Eq. 4).

A :class:`Composition` holds the pre-trained parameters θ_0 and T task vectors τ_i once, and turns a
flat coefficient vector ``x`` into merged parameters

    θ_b = θ_0,b + Σ_i λ_{i,b} · τ_{i,b}        for every parameter block b,

where the λ are read from ``x`` according to the chosen *space* (how many coefficients there are).
The merge is differentiable in ``x`` and nothing else, so a gradient searcher trains only λ.

Example:
    >>> comp = Composition(base, [tau_a, tau_b], ["a", "b"], space="per_block")
    >>> theta = comp.merge(comp.isotropic(0.3))            # task arithmetic, α = 0.3
    >>> logits = functional_forward(model, theta, images)
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from harness.api import HarnessError

from harness.spaces import (SPACES, _LORA, depth_of, draw_partitions, is_norm_block,  # noqa: F401 (re-exported)
                            layer_of, matrices_only, parse_space)


def task_vector(base: dict[str, Tensor], finetuned: dict[str, Tensor]) -> dict[str, Tensor]:
    """τ = θ_ft − θ_0 over the floating-point entries of ``base`` (integer buffers are skipped).

    Args:
        base: pre-trained state dict.
        finetuned: fine-tuned state dict with (at least) the same floating entries.

    Returns:
        A new dict ``{name: finetuned[name] - base[name]}`` in fp32, detached, on the device of
        each ``base`` entry (a fine-tuned entry elsewhere is moved there).
    """
    tau = {}
    for name, b in base.items():
        if not b.is_floating_point():
            continue
        if name not in finetuned:
            raise HarnessError(f"fine-tuned state dict has no block '{name}' of the base model")
        f = finetuned[name]
        if tuple(f.shape) != tuple(b.shape):
            raise HarnessError(f"fine-tuned block '{name}' has shape {tuple(f.shape)}, "
                               f"expected {tuple(b.shape)}")
        if f.device != b.device:  # e.g. a checkpoint loaded to the CPU beside a base on the GPU
            try:
                f = f.to(b.device)
            except (RuntimeError, NotImplementedError) as e:
                raise HarnessError(f"fine-tuned block '{name}' is on {f.device} and cannot be moved to the base's "
                                   f"device {b.device}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        tau[name] = f.detach().float() - b.detach().float()
    return tau


class Composition:
    """θ_0 plus T task vectors, and the map from a flat coefficient vector to merged parameters.

    Args:
        base: pre-trained state dict; its floating entries are the blocks, in the dict's order.
        task_vectors: one dict per task with exactly the base's floating keys and shapes.
        task_names: one unique name per task vector (used in coordinate labels).
        space: ``per_task`` (T), ``per_layer`` (T×G), ``per_block`` (T×B, the paper),
            ``per_partition:K`` (T×B×K; every block's elements, 1-D blocks included, are split into K
            random partitions fixed by ``seed``; ``per_partition:K:matrices``, T×M×K, partitions only
            the M 2-D matrices, one draw per shape, as the released code does: :func:`draw_partitions`) or ``lines`` (2: LiNeS, Wang et al. 2025, every
            task vector scaled by λ_b = first·(1 − d_b) + last·d_b at depth d_b, see :func:`depth_of`;
            the all-ones vector is task arithmetic at α = 1 as in every other space) or ``norms``
            (one additive change per entry of every normalisation layer's weight and bias, see
            :func:`is_norm_block`, and no task vector: norm-layer tuning, the baseline that test-time
            adaptation methods such as SAR build on).
        dtype: storage of the task vectors (fp16 halves memory, as in the paper); the merge computes
            in fp32, or in fp64 when ``dtype`` is fp64 (useful for gradient checks).
        seed: seeds the random partition assignment.
        layer_fn: maps a block name to its layer for ``per_layer``.

    The flat vector is task-major: ``x.view(T, ...)`` gives one row per task.
    """

    def __init__(self, base: dict[str, Tensor], task_vectors: Sequence[dict[str, Tensor]],
                 task_names: Sequence[str], space: str = "per_block",
                 dtype: torch.dtype = torch.float32, seed: int = 0,
                 layer_fn: Callable[[str], str] = layer_of):
        kind, K = parse_space(space)
        task_names = [str(n) for n in task_names]
        if len(task_vectors) != len(task_names):
            raise HarnessError(f"{len(task_vectors)} task vectors but {len(task_names)} task names")
        if not task_vectors:
            raise HarnessError("a composition needs at least one task vector")
        if len(set(task_names)) != len(task_names):
            raise HarnessError(f"task names must be unique, got {task_names}")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise HarnessError(f"task vector storage dtype must be floating point, got {dtype}")

        self.space, self.kind, self.K = str(space), kind, K
        self.task_names = task_names
        self.dtype = dtype
        self.compute_dtype = torch.promote_types(torch.float32, dtype)
        self.seed = seed
        self.blocks = [k for k, v in base.items() if v.is_floating_point()]
        if not self.blocks:
            raise HarnessError("the base model has no floating-point parameters to compose")
        self.T, self.B = len(task_names), len(self.blocks)
        # .to() is a no-op for fp32 inputs, so θ_0 shares memory with the caller's tensors.
        self.base = {k: base[k].detach().to(self.compute_dtype) for k in self.blocks}

        block_set = set(self.blocks)
        for name, tv in zip(task_names, task_vectors):
            for k in tv:
                if k not in block_set:
                    raise HarnessError(f"task '{name}': block '{k}' is not a floating block of the base model")
            for k in self.blocks:
                if k not in tv:
                    raise HarnessError(f"task '{name}': block '{k}' is missing from its task vector")
                if tuple(tv[k].shape) != tuple(self.base[k].shape):
                    raise HarnessError(f"task '{name}': block '{k}' has shape {tuple(tv[k].shape)}, "
                                       f"expected {tuple(self.base[k].shape)}")
        # One (T, *shape) tensor per block: the merge is then a single contraction per block.
        self.tau = [torch.stack([tv[k].detach().to(dtype) for tv in task_vectors]) for k in self.blocks]
        # After :meth:`select`: per block, the task indices whose τ rows ``tau[b]`` holds.
        self.keep: list[Tensor] | None = None

        self.groups: list[str] = []
        self.partitions: list[Tensor] | None = None
        if kind == "per_task":
            self.dim = self.T
            self.labels = list(task_names)
        elif kind == "per_layer":
            layers = [layer_fn(b) for b in self.blocks]
            self.groups = list(dict.fromkeys(layers))
            self._group_index = torch.tensor([self.groups.index(g) for g in layers])
            self.dim = self.T * len(self.groups)
            self.labels = [f"{t}/{g}" for t in task_names for g in self.groups]
        elif kind == "per_block":
            self.dim = self.T * self.B
            self.labels = [f"{t}/{b}" for t in task_names for b in self.blocks]
        elif kind == "lora":
            from harness.lora import LoraFactors
            alpha = _LORA.fullmatch(self.space.strip()).group(2)
            self.lora = LoraFactors(self.blocks, self.base, K, None if alpha is None else float(alpha), seed)
            self.dim, self.labels = self.lora.dim, self.lora.labels
        elif kind == "norms":
            self.free = [b for b, name in enumerate(self.blocks) if is_norm_block(name, self.base[name].shape)]
            if not self.free:
                raise HarnessError(f"the norms space tunes normalisation layers, but none of the {self.B} composed blocks "
                                   f"is one (e.g. {self.blocks[0]!r}); use another --space")
            sizes = [self.base[self.blocks[b]].numel() for b in self.free]
            self._offsets = np.cumsum([0] + sizes).tolist()
            self.dim = int(self._offsets[-1])
            self.labels = [f"{self.blocks[b]}[{j}]" for b, n in zip(self.free, sizes) for j in range(n)]
        elif kind == "lines":
            self._depth = torch.tensor(depth_of(self.blocks), dtype=torch.float64)
            self.dim = 2
            self.labels = ["first", "last"]
        else:
            self.partitions = draw_partitions([self.base[b].shape for b in self.blocks], K, seed, matrices_only(space))
            # The blocks with coefficients (all of them but in the :matrices variant), in order.
            self.parted = [b for b, p in enumerate(self.partitions) if p is not None]
            if not self.parted:
                raise HarnessError(f"the {space} space partitions 2-D weight matrices, and none of the {self.B} composed "
                                   f"blocks is one (e.g. {self.blocks[0]!r} {tuple(self.base[self.blocks[0]].shape)}); "
                                   f"use per_partition:{K}")
            self.dim = self.T * len(self.parted) * K
            self.labels = [f"{t}/{self.blocks[b]}#{k}" for t in task_names for b in self.parted for k in range(K)]

    def __repr__(self) -> str:
        return (f"Composition(T={self.T}, B={self.B}, space={self.space!r}, dim={self.dim}, "
                f"dtype={self.dtype})")

    def _as_tensor(self, x: Tensor | np.ndarray) -> Tensor:
        if not isinstance(x, Tensor):
            x = torch.as_tensor(np.asarray(x, dtype=np.float32))
        if x.numel() != self.dim:
            raise HarnessError(f"coefficient vector has {x.numel()} entries, "
                               f"the space {self.space!r} has {self.dim}")
        device = self.base[self.blocks[0]].device
        return x.reshape(-1).to(device=device, dtype=self.compute_dtype)

    def coefficients(self, x: Tensor | np.ndarray) -> Tensor:
        """Per-(task, block) coefficients λ: (T, B), or (T, B, K) for partitions. Differentiable."""
        x = self._as_tensor(x)
        if self.kind == "per_task":
            return x.view(self.T, 1).expand(self.T, self.B)
        if self.kind == "per_layer":
            return x.view(self.T, len(self.groups))[:, self._group_index.to(x.device)]
        if self.kind == "per_block":
            return x.view(self.T, self.B)
        if self.kind in ("norms", "lora"):  # no task vector takes part
            return torch.zeros(self.T, self.B, device=x.device, dtype=x.dtype)
        if self.kind == "lines":
            d = self._depth.to(device=x.device, dtype=x.dtype)
            return (x[0] * (1 - d) + x[1] * d).expand(self.T, self.B)
        if len(self.parted) == self.B:
            return x.view(self.T, self.B, self.K)
        lam = x.new_zeros(self.T, self.B, self.K)
        lam[:, self.parted] = x.view(self.T, len(self.parted), self.K)
        return lam

    def merge(self, x: Tensor | np.ndarray, like: tuple | None = None) -> dict[str, Tensor]:
        """θ = θ_0 + Σ_i λ_{i,b} τ_{i,b} for every block of the flat coefficients ``x`` (tensor or
        numpy array): ``{block name: tensor}`` in fp32 (fp64 for an fp64 composition),
        differentiable w.r.t. ``x`` if it requires grad. ``like``, ``(coefficients(x'),
        merge(x'))`` of an earlier point (no gradient), lends each block whose λ are unchanged its
        merged tensor (blocks are merged one by one, so that is the same value)."""
        if self.kind == "lora":
            x = self._as_tensor(x)
            merged = dict(self.base)
            for b, delta in zip(self.lora.index, self.lora.deltas(x)):
                name = self.blocks[b]
                merged[name] = self.base[name] + delta.view(self.base[name].shape)
            return merged
        if self.kind == "norms":
            x = self._as_tensor(x)
            merged = dict(self.base)
            for i, b in enumerate(self.free):
                name = self.blocks[b]
                merged[name] = self.base[name] + x[self._offsets[i]:self._offsets[i + 1]].view(self.base[name].shape)
            return merged
        lam = self.coefficients(x)
        merged = {}
        for b, name in enumerate(self.blocks):
            if like is not None and torch.equal(lam[:, b], like[0][:, b]):
                merged[name] = like[1][name]
                continue
            tau = self.tau[b].to(self.compute_dtype)
            lam_b = lam[:, b] if self.keep is None else lam[self.keep[b], b]
            if self.partitions is None:
                delta = torch.tensordot(lam_b, tau, dims=1)
            elif self.partitions[b] is None:  # a block the :matrices variant leaves out
                merged[name] = self.base[name]
                continue
            else:
                # Gather each element's coefficient from its partition: (T, K)[:, idx] → (T, *shape).
                per_elem = lam_b[:, self.partitions[b].long()]
                delta = (per_elem * tau).sum(0)
            merged[name] = self.base[name] + delta
        return merged

    def select(self, keep: Sequence[Sequence[int]]) -> "Composition":
        """Hold only some task vectors per block (informative block selection, paper App. D.6).

        Block b keeps the task vectors ``keep[b]`` (indices into the tasks) and frees the others;
        their coefficients stay in ``x`` but no longer change the merge (their gradient is 0).
        The space and its dimension are unchanged, so any searcher runs as before. In place.

        Args:
            keep: one list of task indices per block, in block order (may be empty).
        """
        if len(keep) != self.B:
            raise HarnessError(f"block selection needs one list of task indices per block: "
                               f"got {len(keep)} lists for {self.B} blocks")
        current = self.keep or [torch.arange(self.T)] * self.B
        new_tau, new_keep = [], []
        for b, idx in enumerate(keep):
            idx = sorted({int(i) for i in idx})
            if any(not 0 <= i < self.T for i in idx):
                raise HarnessError(f"block '{self.blocks[b]}': task index out of range 0..{self.T - 1} in {idx}")
            held = current[b].tolist()
            missing = [i for i in idx if i not in held]
            if missing:
                raise HarnessError(f"block '{self.blocks[b]}': task vector(s) {missing} were already dropped")
            rows = torch.tensor([held.index(i) for i in idx], dtype=torch.long)
            new_tau.append(self.tau[b][rows.to(self.tau[b].device)])  # indexing copies: the rest is freed
            new_keep.append(torch.tensor(idx, dtype=torch.long, device=self.tau[b].device))
        self.tau, self.keep = new_tau, new_keep
        return self

    def isotropic(self, alpha: float) -> np.ndarray:
        """The ``x`` giving λ = α for every (task, block): task arithmetic θ_0 + α Σ_i τ_i."""
        if self.kind in ("norms", "lora"):
            raise HarnessError(f"the {self.kind} space holds no task vector to scale")
        return np.full(self.dim, float(alpha), dtype=np.float64)

    def one_hot(self, i: int) -> np.ndarray:
        """The ``x`` giving λ = 1 on every block of task ``i`` and 0 elsewhere (θ_0 + τ_i)."""
        if not 0 <= i < self.T:
            raise HarnessError(f"task index {i} out of range: there are {self.T} task vectors")
        if self.kind in ("norms", "lora"):
            raise HarnessError(f"the {self.kind} space holds no task vector")
        if self.kind == "lines" and self.T > 1:
            raise HarnessError("the lines space scales every task vector alike: it cannot hold one task vector alone")
        x = np.zeros((self.T, self.dim // self.T))
        x[i] = 1.0
        return x.reshape(-1)

    def expand(self, x: Tensor | np.ndarray) -> np.ndarray:
        """Coefficients as a numpy array, (T, B) or (T, B, K), for reports and heat maps."""
        with torch.no_grad():
            lam = self.coefficients(x.detach() if isinstance(x, Tensor) else x)
        return lam.cpu().numpy().astype(np.float64).copy()

    def memory_bytes(self) -> int:
        """Bytes held by the stored task vectors (not θ_0, not the partition assignments)."""
        return sum(t.numel() * t.element_size() for t in self.tau)

    def to(self, device: torch.device | str) -> "Composition":
        """Move θ_0, the task vectors and the partition assignments to ``device`` (in place)."""
        self.base = {k: v.to(device) for k, v in self.base.items()}
        self.tau = [t.to(device) for t in self.tau]
        if self.keep is not None:
            self.keep = [k.to(device) for k in self.keep]
        if self.partitions is not None:
            moved = {id(p): p.to(device) for p in self.partitions if p is not None}  # shared draws stay shared
            self.partitions = [None if p is None else moved[id(p)] for p in self.partitions]
        if self.kind == "lora":
            self.lora.to(device)
        return self


def top_tasks_per_block(scores: np.ndarray, b: int) -> list[list[int]]:
    """For each block (column of ``scores``, shape (T, B)), the ``b`` tasks with the largest score.

    Ties break towards the lower task index, so the choice is deterministic.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise HarnessError(f"block scores must be a (tasks, blocks) array, got shape {scores.shape}")
    b = max(0, min(int(b), scores.shape[0]))
    return [sorted(np.argsort(-scores[:, j], kind="stable")[:b].tolist()) for j in range(scores.shape[1])]


def functional_forward(module: nn.Module, params: dict[str, Tensor], *args, **kwargs):
    """Run ``module`` with ``params`` in place of its parameters (``torch.func.functional_call``).

    Buffers always come from the module itself: entries of ``params`` that name a buffer (e.g. BN
    running statistics) are ignored, so running stats are never merged and stay the base module's.
    Parameters missing from ``params`` fall back to the module's own.

    Args:
        module: the (pre-trained) module whose architecture is used.
        params: e.g. the output of :meth:`Composition.merge`.
        *args, **kwargs: the module's inputs.
    """
    buffer_names = {n for n, _ in module.named_buffers()}
    param_names = {n for n, _ in module.named_parameters()}
    chosen = {}
    for k, v in params.items():
        if k in buffer_names:
            continue
        if k not in param_names:
            raise HarnessError(f"parameter '{k}' is not a parameter of {type(module).__name__}")
        chosen[k] = v
    return torch.func.functional_call(module, chosen, args, kwargs)
