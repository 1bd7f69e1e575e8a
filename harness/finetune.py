"""Fine-tune a source's tail on one data set and return the task vector τ = θ_ft − θ_0.

This is how the zoos make their task vectors, and how a user with a pre-trained model and data
but no fine-tuned checkpoints makes theirs:

    >>> source = from_checkpoints("ViT-B-32", "base.pt", None, ["cars", "pets"], "data/")
    >>> for ds in source.datasets:
    ...     source.task_vectors[ds] = finetune(source, ds, steps=500, batch_size=128, lr=1e-5, seed=0)
"""
from __future__ import annotations

from typing import Callable

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.api import HarnessError
from harness.sources.base import ModelSource


def one_cycle(opt: torch.optim.Optimizer, steps: int, warmup: float = 0.1):
    """One-cycle learning rate: linear warm-up from lr/25 to lr over ``warmup`` of the steps, then
    cosine annealing towards 0 (the last step still moves). Unlike
    ``torch.optim.lr_scheduler.OneCycleLR`` it is valid for any number of steps (OneCycleLR
    divides by zero when 0.1 × steps == 1)."""
    w = round(warmup * steps)

    def factor(t: int) -> float:
        if t < w:
            return 0.04 + 0.96 * t / w
        return 0.5 * (1 + math.cos(math.pi * (t - w) / max(1, steps - w)))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def finetune(source: ModelSource, ds: str, steps: int, batch_size: int, lr: float, seed: int,
             weight_decay: float = 0.0,
             progress: Callable[[int, float], None] | None = None) -> dict[str, Tensor]:
    """Train the tail's parameters on ``ds``'s cached train split; heads and prefix stay frozen.

    The forward pass is functional (clones of ``source.base`` with gradients, through
    :meth:`ModelSource.logits`), so the source itself is never modified. AdamW with a one-cycle
    schedule (:func:`one_cycle`); mini-batches are drawn with replacement from a
    ``torch.Generator`` seeded with ``seed``, so the same seed and thread count give
    bit-identical task vectors.

    Args:
        source: the model source; ``source.inputs[ds]["train"]`` is trained on.
        ds: the data set.
        steps: optimiser steps.
        batch_size: samples per step.
        lr: peak learning rate.
        seed: seeds the batch sampling.
        weight_decay: AdamW's decoupled weight decay (pulls θ towards 0, not towards θ_0).
        progress: called as ``progress(step, loss)`` after every step.

    Returns:
        ``{block: θ_ft − θ_0}`` in fp32, with the keys of ``source.base``.
    """
    params = {k: v.detach().clone().requires_grad_(True) for k, v in source.base.items()}
    _train(source, ds, list(params.values()), lambda: params, steps, batch_size, lr, seed, weight_decay, progress)
    return {k: params[k].detach() - v for k, v in source.base.items()}


def finetune_lora(source: ModelSource, ds: str, rank: int, steps: int, batch_size: int, lr: float, seed: int,
                  weight_decay: float = 0.0, progress: Callable[[int, float], None] | None = None
                  ) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
    """Like :func:`finetune`, but only a rank-``rank`` LoRA adapter of every weight matrix of the
    tail is trained (:class:`harness.lora.LoraFactors`, α = r, A from its seeded start, B from 0).

    Returns:
        ``(τ, factors)``: the dense task vector (B·A on the adapted blocks, 0 elsewhere, with the
        keys of ``source.base``) and ``{block: (A, B)}``, the factors
        :class:`harness.lora.FactorComposition` composes.
    """
    from harness.lora import LoraFactors
    if rank < 1:
        raise HarnessError(f"LoRA fine-tuning needs a rank >= 1, got {rank}")
    blocks = [k for k, v in source.base.items() if v.is_floating_point()]
    lora = LoraFactors(blocks, source.base, rank, None, seed)
    x = torch.zeros(lora.dim, requires_grad=True)

    def merged():
        params = dict(source.base)
        for b, delta in zip(lora.index, lora.deltas(x)):
            params[blocks[b]] = source.base[blocks[b]] + delta.view(source.base[blocks[b]].shape)
        return params
    _train(source, ds, [x], merged, steps, batch_size, lr, seed, weight_decay, progress)
    factors = lora.factors(x.detach(), blocks)
    tau = {k: torch.zeros_like(v) for k, v in source.base.items()}
    for k, (a, bm) in factors.items():
        tau[k] = (bm @ a).view(source.base[k].shape)
    return tau, factors


def _train(source: ModelSource, ds: str, trained: list[Tensor], params: Callable[[], dict[str, Tensor]], steps: int,
           batch_size: int, lr: float, seed: int, weight_decay: float,
           progress: Callable[[int, float], None] | None) -> None:
    """The fine-tuning loop both :func:`finetune` and :func:`finetune_lora` run: AdamW on the
    tensors ``trained`` with the one-cycle schedule, cross-entropy of ``source.logits(params(), …)``
    on mini-batches of ``ds``'s train split drawn with replacement from a generator seeded with
    ``seed``. Checks the data set and the settings first."""
    if ds not in source.heads:
        raise HarnessError(f"no data set '{ds}' in {source.name}; it has {', '.join(source.datasets)}")
    if "train" not in source.inputs[ds] or len(source.labels[ds]["train"]) == 0:
        raise HarnessError(f"data set '{ds}' has no train split to fine-tune on")
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise HarnessError(f"fine-tuning needs steps >= 1, batch_size >= 1 and lr > 0, "
                           f"got {steps}, {batch_size}, {lr}")
    x, y = source.inputs[ds]["train"], source.labels[ds]["train"]
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=weight_decay)
    sched = one_cycle(opt, steps)
    gen = torch.Generator().manual_seed(int(seed))
    for step in range(steps):
        idx = torch.randint(0, len(y), (batch_size,), generator=gen)
        loss = F.cross_entropy(source.logits(params(), x[idx], ds), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(step, loss.item())
