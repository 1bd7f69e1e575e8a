"""Linearised models: the first-order Taylor expansion of a source's tail around θ0.

A linearised model computes ``f_lin(x; θ) = f(x; θ0) + J(x; θ0)·(θ − θ0)``, where ``J`` is the
Jacobian of the tail's output with respect to its parameters at the pre-trained weights
(Ortiz-Jimenez et al., 2023, "Task arithmetic in the tangent space"; the "Lin." rows of the aTLAS
paper's Tables 1, 2 and 9). ``J·Δθ`` is one forward-mode product (``torch.func.jvp`` over
:func:`harness.composition.functional_forward`), so a linearised forward costs about two to three
plain ones and never forms ``J``.

:func:`linearized` wraps a :class:`ModelSource` so that *every* forward of the tail — the engines'
scores, the tasks' own losses, accuracies, references, fine-tuning — is the linearised one. The
output is then an affine function of θ, hence of the composition coefficients λ (a merge is
affine in λ): what :mod:`harness.engines.tangent` exploits.

Task vectors fine-tuned in the tangent space (``finetune --mode linear``, the zoos'
``ft_mode=linear``) are ordinary differences θ_ft − θ0; they are meant to be composed and scored
with ``-t linearize=true``.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from harness.checkpoints import safetensors_metadata
from harness.composition import functional_forward
from harness.sources import task_check
from harness.sources.base import ModelSource

# The safetensors metadata entry that marks a checkpoint fine-tuned in the tangent space.
LINEAR_METADATA = {"atlas_harness.fine_tuning": "linear"}


def tangent_checkpoint(path) -> bool:
    """Whether the checkpoint file at ``path`` says it was fine-tuned in the tangent space."""
    meta = safetensors_metadata(path)
    return all(meta.get(k) == v for k, v in LINEAR_METADATA.items())


def tangent_forward(module: nn.Module, base: dict[str, Tensor], params: dict[str, Tensor], *args) -> Tensor:
    """``f(args; θ0) + J(args; θ0)·(params − θ0)`` for ``module`` at θ0 = ``base``.

    Entries of ``params`` that name buffers are ignored (as in :func:`functional_forward`);
    parameters missing from ``params`` stay at θ0 (no tangent). Differentiable with respect to
    ``params`` (reverse mode over the forward-mode product)."""
    out, jv = jvp_parts(module, base, params, *args)
    return out + jv


def jvp_parts(module: nn.Module, base: dict[str, Tensor], params: dict[str, Tensor], *args) -> tuple[Tensor, Tensor]:
    """``(f(args; θ0), J(args; θ0)·(params − θ0))``, the two terms of :func:`tangent_forward`."""
    names = {n for n, _ in module.named_parameters()}
    # nn.MultiheadAttention's fused inference kernel and the fused scaled-dot-product kernels have
    # no forward-mode derivative; the composed path with the math kernel computes the same
    # attention and has one. Both are chosen for this call only.
    fast = torch.backends.mha.get_fastpath_enabled()
    keys = [k for k in params if k in names]
    primal = {k: base[k].to(params[k].dtype) for k in keys}
    tangent = {k: params[k] - primal[k] for k in keys}
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            out, jv = torch.func.jvp(lambda p: functional_forward(module, p, *args), (primal,), (tangent,))
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return out, jv


@dataclasses.dataclass(eq=False)
class LinearizedSource(ModelSource):
    """A :class:`ModelSource` whose tail forward is the linearisation at its own θ0 (``base``).

    Everything else (inputs, heads, task vectors, data) is the wrapped source's, shared, not
    copied. ``meta["linearized"]`` is True; ``meta["finetuned_acc"]`` holds the *linearised*
    fine-tuned models' accuracies once :meth:`evaluate_references` has run, and
    ``meta["finetuned_acc_standard"]`` the standard ones it replaced."""

    linearized = True

    def features(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        return self.chunked(lambda c: tangent_forward(self.tail, self.base, params, c), x)

    def tangent_features(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """``J(x; θ0)·(params − θ0)`` alone: the linearised features less ``f(x; θ0)``."""
        return self.chunked(lambda c: jvp_parts(self.tail, self.base, params, c)[1], x)

    def reference_material(self) -> dict:
        return {"forward": "linearized"}


def linearized(source: ModelSource, cache_dir: str | None = None, references: bool = True) -> LinearizedSource:
    """``source`` with a linearised tail forward (see :class:`LinearizedSource`).

    When the task vectors were fine-tuned in the tangent space (``meta["fine_tuning"] == "linear"``:
    ``finetune --mode linear`` checkpoints, ``ft_mode=linear`` zoos) and ``references`` is set, the
    fine-tuned accuracies are recomputed under the linearised forward — the fine-tuned models *are*
    the linearised ones, and a linearised run's normalised accuracy divides by theirs — and so is the
    checkpoint check's table when the source has one; both are read from the reference cache in
    ``cache_dir`` when computed before. Standard task vectors linearised after the fact keep the
    standard fine-tuned models as their references (the models their owner has); the zero-shot
    accuracy is the same either way (Δθ = 0)."""
    if isinstance(source, LinearizedSource):
        return source
    fields = {f.name: getattr(source, f.name) for f in dataclasses.fields(ModelSource)}
    fields["meta"] = dict(source.meta, linearized=True)
    out = LinearizedSource(**fields)
    if references and source.meta.get("fine_tuning") == "linear" and source.meta.get("finetuned_acc") is not None:
        standard = dict(source.meta["finetuned_acc"])
        # The checkpoint check, when the source carries one, is judged on the linearised models too.
        out.evaluate_references(cache_dir, extra=task_check.EXTRA if task_check.META_KEY in source.meta else None)
        out.meta["finetuned_acc_standard"] = standard
    return out
