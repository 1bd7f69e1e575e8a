"""Few-shot adapters on top of a (composed) model's features: Tip-Adapter(-F) and LP++.

Both take the tail's features ``z`` of an image and the frozen head's logits ``h`` and return
adapted logits; both are small modules whose parameters are a flat vector, so the few-shot task can
train them after a coefficient search (sequential) or as extra coordinates of the search space
(joint, with gradient searchers).

- **Tip-Adapter** (Zhang et al., ECCV 2022): a cache of the shots' L2-normalised features (keys)
  and one-hot labels (values); ``logits = h + α · exp(−β (1 − ẑ·K̂ᵀ)) · V``. Training-free as
  published; **Tip-Adapter-F** learns the keys. α = 1 and β = 5.5 are the paper's starting values
  (its ImageNet setting); Tip-Adapter-F's keys are trained with AdamW at lr 1e-3.
- **LP++** (Huang et al., CVPR 2024): a linear probe whose visual prototypes start at the shots'
  class means of L2-normalised features, blended per class with the text (frozen head) logits:
  ``logits = s · ẑ·Wᵀ + a ⊙ h``, with ``W`` and ``a`` learned (``a`` starts at 1; ``s`` fixed, see
  :class:`LPPlusPlus`). Two optimisers train it: full-batch AdamW (:func:`train`, the default) or
  the paper's own, block-coordinate majorize-minimize gradient steps whose step sizes are the
  inverse Lipschitz constants of the two blocks' gradients on the shots (:func:`train_lpp_mm`, no
  learning rate). The model is the paper's; the start differs (see :func:`lpp_step_sizes`).

``h`` is whatever the source's head gives (CLIP: 100 × cosine to the class texts; the effnet zoo:
a fitted linear head), so α is relative to those logits.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.api import HarnessError

ADAPTERS = ("none", "tip", "tip-f", "lpp")


class Adapter:
    """Adapted logits from features and head logits, with parameters as one flat vector.

    ``init`` is the flat starting vector (computed from the shots); :meth:`logits` takes the flat
    parameters explicitly, so a search can hold them as coordinates (``init + scale · x``) and
    differentiate through them."""

    name = "none"

    def __init__(self, z: Tensor, y: Tensor, n_classes: int, **options):
        self.n_classes = n_classes
        self.init = torch.zeros(0, device=z.device)

    @property
    def size(self) -> int:
        return int(self.init.numel())

    def logits(self, z: Tensor, h: Tensor, p: Tensor) -> Tensor:
        return h


class TipAdapter(Adapter):
    """Tip-Adapter's cache model. ``trainable`` (Tip-Adapter-F): the keys are the parameters;
    otherwise there are none (training-free)."""

    def __init__(self, z: Tensor, y: Tensor, n_classes: int, alpha: float = 1.0, beta: float = 5.5,
                 trainable: bool = False):
        super().__init__(z, y, n_classes)
        self.name = "tip-f" if trainable else "tip"
        self.alpha, self.beta, self.trainable = float(alpha), float(beta), trainable
        self.keys = F.normalize(z.detach().float(), dim=-1)
        self.values = F.one_hot(y, n_classes).float()
        self.init = self.keys.reshape(-1).clone() if trainable else torch.zeros(0, device=z.device)

    def logits(self, z: Tensor, h: Tensor, p: Tensor) -> Tensor:
        keys = p.view_as(self.keys) if self.trainable else self.keys
        affinity = F.normalize(z.float(), dim=-1) @ keys.T
        return h + self.alpha * torch.exp(-self.beta * (1 - affinity)) @ self.values


class LPPlusPlus(Adapter):
    """LP++'s linear probe: prototypes ``P`` (C × D, starting at the class means of normalised shot
    features) and per-class blending weights ``a`` (C, start 1) of the head's logits:
    ``logits = s · ẑ·Pᵀ + a ⊙ h``. The fixed ``s`` makes the prototype logits as spread as the head's
    on the shots at the start (LP++ blends cosine-scale text logits; heads here carry their own scale,
    CLIP's 100 or a fitted head's), so one learning rate suits every source."""

    name = "lpp"

    def __init__(self, z: Tensor, y: Tensor, n_classes: int, h: Tensor | None = None):
        super().__init__(z, y, n_classes)
        zn = F.normalize(z.detach().float(), dim=-1)
        counts = torch.bincount(y, minlength=n_classes).clamp(min=1).to(zn.dtype)
        protos = torch.zeros(n_classes, zn.shape[1], device=zn.device).index_add_(0, y, zn) / counts[:, None]
        spread = (zn @ protos.T).std()
        spread_h = h.detach().float().std() if h is not None and h.numel() > 1 else torch.tensor(0.0)
        # (A constant head, or a single shot, gives no spread to match: the prototypes keep scale 1.)
        self.scale = float(spread_h / spread) if spread > 0 and spread_h > 0 else 1.0
        self.shape = protos.shape
        self.init = torch.cat([protos.reshape(-1), torch.ones(n_classes, device=zn.device)])

    def logits(self, z: Tensor, h: Tensor, p: Tensor) -> Tensor:
        n = self.shape[0] * self.shape[1]
        w, a = p[:n].view(self.shape), p[n:]
        return self.scale * F.normalize(z.float(), dim=-1) @ w.T + a * h


def make(name: str, z: Tensor, y: Tensor, n_classes: int, alpha: float, beta: float, h: Tensor | None = None) -> Adapter:
    """The adapter ``name`` (one of :data:`ADAPTERS`) built from the shots' features ``z``, labels
    ``y`` and head logits ``h``."""
    if name == "none":
        return Adapter(z, y, n_classes)
    if name in ("tip", "tip-f"):
        return TipAdapter(z, y, n_classes, alpha, beta, trainable=name == "tip-f")
    if name == "lpp":
        return LPPlusPlus(z, y, n_classes, h)
    raise HarnessError(f"unknown adapter {name!r}; valid: {', '.join(ADAPTERS)}")


def train(adapter: Adapter, z: Tensor, h: Tensor, y: Tensor, steps: int, lr: float, weight_decay: float = 0.0) -> Tensor:
    """Full-batch AdamW on the adapter's parameters (cross-entropy of its logits on the shots),
    cosine-annealed over ``steps``; returns the trained flat parameters (``init`` when it has none)."""
    p = adapter.init.clone()
    if not adapter.size or steps <= 0:
        return p
    p.requires_grad_(True)
    opt = torch.optim.AdamW([p], lr=lr, weight_decay=weight_decay, eps=1e-4)
    z, h = z.detach(), h.detach()
    for t in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * t / steps))
        loss = F.cross_entropy(adapter.logits(z, h, p), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return p.detach()


@torch.no_grad()
def lpp_step_sizes(adapter: LPPlusPlus, z: Tensor, h: Tensor) -> tuple[float, float]:
    """LP++'s step sizes ``(1/L_P, 1/L_a)`` on the shots' features ``z`` and head logits ``h``: the
    inverse Lipschitz constants of the gradients of the mean cross-entropy ``ℓ`` w.r.t. the
    prototypes ``P`` and the blending weights ``a`` (0 for a block whose constant is 0).

    Derivation, for ``N`` shots, logits ``l_i = s · P ẑ_i + a ⊙ h_i``, ``p_i = softmax(l_i)``: a
    softmax cross-entropy's Hessian w.r.t. its logits is ``A_i = diag(p_i) − p_i p_iᵀ``, and
    ``0 ≼ A_i ≼ ½ I`` (``vᵀA_i v`` is the variance of ``v``'s entries under ``p_i``, at most
    ``(max v − min v)²/4 ≤ ½`` for a unit ``v``; two classes at ½ each reach it). So

    - w.r.t. ``P`` (C × D): ``∇²ℓ = (s²/N) Σ_i A_i ⊗ ẑ_i ẑ_iᵀ ≼ (s²/2N) I ⊗ ẐᵀẐ``, hence
      ``L_P = s² λ_max(ẐᵀẐ) / (2N)``;
    - w.r.t. ``a`` (C): ``∇²ℓ = (1/N) Σ_i diag(h_i) A_i diag(h_i) ≼ (1/2N) diag(Σ_i h_ik²)``,
      hence ``L_a = max_k Σ_i h_ik² / (2N)``.

    A gradient step of ``1/L`` on one block minimises the quadratic majorizer
    ``ℓ(x) + ∇ℓ(x)ᵀd + (L/2)|d|²`` of that block, so ``ℓ`` never increases (majorize-minimize).

    The authors' code (FereshteShakeri/FewShot-CLIP-Strong-Baseline, methods/linear_probe_p2.py,
    ``calculate_lr_w`` and ``calculate_lr_alpha``, pointing to the paper's Eqs. 10 and 11) has the
    same two data terms with other constants, on CLIP's raw cosines (``s = 1``, ``h_ik = f_i·t_k``):
    prototype step ``4N / λ_max(FᵀF)`` (twice ours: a per-sample curvature of ¼, which bounds
    ``A_i`` only for two classes' logit difference) and blend step ``N / (4 max_k Σ_i h_ik²)``
    (an eighth of ours). Here the prototype logits carry the fixed ``s`` and ``h`` its own scale,
    hence the ``s²`` and the raw ``h``. Their start also differs: prototypes at class *sums* of the
    normalised shots and one blend ``250 ×`` the mean cosine of a shot with its class text for
    every class (a CLIP-cosine rule); here both solvers start from :class:`LPPlusPlus`'s ``init``.
    """
    zn = F.normalize(z.detach().double(), dim=-1)
    n = max(zn.shape[0], 1)
    lam = float(torch.linalg.svdvals(zn)[0] ** 2) if zn.numel() else 0.0
    l_p = adapter.scale ** 2 * lam / (2 * n)
    l_a = float((h.detach().double() ** 2).sum(0).max()) / (2 * n) if h.numel() else 0.0
    return (1 / l_p if l_p > 0 else 0.0), (1 / l_a if l_a > 0 else 0.0)


def train_lpp_mm(adapter: LPPlusPlus, z: Tensor, h: Tensor, y: Tensor, steps: int) -> Tensor:
    """LP++'s block-coordinate majorize-minimize descent on the shots (full batch): ``steps``
    rounds, each a gradient step on the prototypes ``P`` then one on the blends ``a`` (at the new
    ``P``), of sizes :func:`lpp_step_sizes`; the mean cross-entropy never increases. Returns the
    flat parameters, as :func:`train` does. (The authors' code takes 300 full-batch epochs of SGD
    with momentum 0.9 on ``P`` and its bias, and one step on ``a`` every 10th epoch, with an
    ``a``-gradient summed over all epochs so far; momentum voids the descent guarantee, so
    here the steps are plain and alternate.)"""
    p = adapter.init.clone()
    if steps <= 0:
        return p
    z, h = z.detach(), h.detach()
    step_p, step_a = lpp_step_sizes(adapter, z, h)
    n = adapter.shape[0] * adapter.shape[1]
    for _ in range(steps):
        for block, step in ((slice(0, n), step_p), (slice(n, None), step_a)):
            q = p.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(adapter.logits(z, h, q), y), q)
            p[block] -= step * g[block]
    return p


# Tip-Adapter's hyper-parameter grid as its released configuration sets it for ImageNet: 200 values of
# the sharpness β in [0.1, 7) and 20 of the residual ratio α in [0.1, 3), each a linear ramp.
TIP_GRID = ((0.1, 7.0, 200), (0.1, 3.0, 20))


@torch.no_grad()
def search_tip(adapter: TipAdapter, p: Tensor, z: Tensor, h: Tensor, y: Tensor, grid=TIP_GRID) -> tuple[float, float, float]:
    """Tip-Adapter's search of (α, β) on labelled validation features ``z`` (head logits ``h``):
    the grid point with the best accuracy (the first of equals, β then α ascending), and that
    accuracy. ``p``: the adapter's parameters (the trained keys of Tip-Adapter-F)."""
    (b0, b1, nb), (a0, a1, na) = grid
    keys = p.view_as(adapter.keys) if adapter.trainable else adapter.keys
    affinity = F.normalize(z.float(), dim=-1) @ keys.T
    best = (-1.0, adapter.alpha, adapter.beta)
    for beta in (b0 + i * (b1 - b0) / nb for i in range(nb)):
        cache = torch.exp(-beta * (1 - affinity)) @ adapter.values
        for alpha in (a0 + i * (a1 - a0) / na for i in range(na)):
            acc = float(((h + alpha * cache).argmax(1) == y).float().mean())
            if acc > best[0]:
                best = (acc, alpha, beta)
    return round(best[1], 6), round(best[2], 6), round(best[0], 6)

