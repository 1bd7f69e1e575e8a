"""WUDI (Cheng et al., ICML 2025), data-free merging by gradient descent on the task vectors."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.api import Transform, option
from harness.transforms.common import as_matrix, combine, conv_option, finite, is_matrix, other_option, stack


class Wudi(Transform):
    """WUDI: per weight matrix, the merged update τ_m that least disturbs each task on its own
    inputs, approximated by the task vector's row space: minimise Σ_i ‖(τ_m − τ_i) τ_iᵀ‖² / ‖τ_i‖²
    by Adam from τ_m = Σ_i τ_i (``steps`` steps at ``lr``, the paper's and FusionBench's
    settings; deterministic; the gradient in closed form, see :func:`descend`). Blocks that are not matrices are averaged (``other=mean``, the
    paper) or summed. ``conv`` as for ``iso``. Returns one vector, ``wudi``.
    """

    name = "wudi"
    description = "WUDI: per matrix, the merge least disturbing each task's row space, by Adam (data-free)"

    @dataclass
    class Options:
        steps: int = option(300, "Adam steps per weight matrix", ge=1)
        lr: float = option(1e-5, "Adam learning rate", gt=0)
        other: str = other_option()
        conv: str = conv_option("optimised")

    def apply(self, task_vectors, names, seed):
        o = self.options
        out, matrices, losses = {}, 0, []
        for key in task_vectors[0]:
            t = stack(task_vectors, key)
            if not is_matrix(t[0], o.conv):
                out[key] = combine(t, o.other)
                continue
            tvs = torch.stack([as_matrix(x) for x in t])
            merged, loss = descend(tvs, o.steps, o.lr)
            losses.append(loss)
            out[key] = finite(merged.detach().reshape(t[0].shape), "wudi")
            matrices += 1
        return [out], ["wudi"], {"matrices": matrices, "final_loss": sum(losses)}


def descend(tvs, steps: int, lr: float) -> tuple:
    """Adam on L(τ_m) = Σ_i ‖(τ_m − τ_i) τ_iᵀ‖² / ‖τ_i‖² from τ_m = Σ_i τ_i; returns τ_m and L.

    L is quadratic: with G_i = τ_iᵀ τ_i / ‖τ_i‖² (in × in), its gradient is 2 (τ_m H − C) where
    H = Σ G_i and C = Σ τ_i G_i are computed once, so a step costs one (out × in × in) product
    instead of T products of (out × in × out) through autograd; the gradients are the same."""
    n = tvs.reshape(len(tvs), -1).square().sum(1).clamp(min=torch.finfo(tvs.dtype).tiny)
    h = torch.zeros(tvs.shape[2], tvs.shape[2], dtype=tvs.dtype)
    c = torch.zeros_like(tvs[0])
    const = 0.0
    for tau, norm in zip(tvs, n):
        g = tau.T @ tau / norm
        h += g
        c += tau @ g
        const += float((tau @ g * tau).sum())
    merged = tvs.sum(0).clone()
    opt = torch.optim.Adam([merged.requires_grad_(True)], lr=lr)
    for _ in range(steps):
        with torch.no_grad():
            merged.grad = 2 * (merged @ h - c)
        opt.step()
    m = merged.detach()
    loss = float((m @ h * m).sum() - 2 * (m * c).sum()) + const  # L(τ_m) expanded: tr(m H mᵀ) − 2 tr(m Cᵀ) + Σ tr(τ G τᵀ)
    return m, max(loss, 0.0)
